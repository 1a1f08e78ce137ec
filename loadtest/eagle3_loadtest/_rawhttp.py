"""HTTP/1.1 over a bare socket, for the faults no HTTP client will commit on purpose.

A client library always finishes a request and reads the answer at full speed; a crashed
trainer or a congested link does neither. These functions send half a request and hang
up, send a whole one and hang up before the answer, or read the answer at a set rate and
give up after a set time. Under Locust the socket module is gevent's, so they block only
the calling user.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

__all__ = ["SlowRead", "address_of", "request_bytes", "send_and_hang_up", "slow_read"]

_RECV_BUFFER = 64 * 1024  # small, so the server's writes meet back-pressure


def address_of(url: str) -> tuple[str, int]:
    """``(host, port)`` of an ``http://`` URL."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"raw-socket faults need an http:// URL, got {url!r}")
    return parts.hostname, parts.port or 80


def request_bytes(
    method: str, path: str, address: tuple[str, int], body: bytes, headers: Mapping[str, str] | None = None
) -> tuple[bytes, bytes]:
    """The request head (status line and headers) and the body, ready to send."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {address[0]}:{address[1]}", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"), body


def _connect(address: tuple[str, int], timeout: float) -> socket.socket:
    sock = socket.create_connection(address, timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def send_and_hang_up(address: tuple[str, int], data: bytes, timeout: float) -> int:
    """Send ``data`` and close without reading; returns the bytes sent.

    A server that closes first (it rejected the request early) is not an error here.
    """
    with _connect(address, timeout) as sock:
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            return 0
        # SO_LINGER 0 turns the close into a reset, like a killed process's socket.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    return len(data)


@dataclass(frozen=True)
class SlowRead:
    status: int | None  # None: the connection ended before a whole status line and headers
    content_length: int | None
    body_read: int
    complete: bool
    elapsed_s: float


def slow_read(
    address: tuple[str, int], head: bytes, body: bytes, rate: int, max_time: float, answer_timeout: float
) -> SlowRead:
    """Send a request, wait up to ``answer_timeout`` for the answer to start, then read it at
    ``rate`` bytes/s until it is complete or ``max_time`` has passed, and hang up."""
    start = time.monotonic()
    received = bytearray()
    body_read, content_length, status = 0, None, None
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _RECV_BUFFER)
        sock.settimeout(answer_timeout)
        sock.connect(address)
        sock.sendall(head + body)
        # The server may queue the forward behind others: waiting for it is not the fault.
        first = sock.recv(1024)
        reading_since = time.monotonic()
        deadline = reading_since + max_time
        chunk = first
        while chunk:
            if status is None:
                received += chunk
                header_end = received.find(b"\r\n\r\n")
                if header_end >= 0:
                    status = _status(bytes(received[:header_end])) or 0
                    content_length = _content_length(bytes(received[:header_end]))
                    body_read = len(received) - header_end - 4
            else:
                body_read += len(chunk)
            if content_length is not None and body_read >= content_length:
                break
            now = time.monotonic()
            # Pace: never be ahead of rate x reading time.
            ahead = body_read / rate - (now - reading_since)
            if ahead > 0:
                time.sleep(min(ahead, max(deadline - now, 0.0)))
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            sock.settimeout(remaining)
            try:
                chunk = sock.recv(min(_RECV_BUFFER, max(rate // 10, 1024)))
            except TimeoutError:
                break
    complete = content_length is not None and body_read >= content_length
    return SlowRead(status, content_length, body_read, complete, time.monotonic() - start)


def _status(head: bytes) -> int | None:
    parts = head.split(b"\r\n", 1)[0].split()
    if len(parts) >= 2 and parts[0].startswith(b"HTTP/") and parts[1].isdigit():
        return int(parts[1])
    return None


def _content_length(head: bytes) -> int | None:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length" and value.strip().isdigit():
            return int(value.strip())
    return None
