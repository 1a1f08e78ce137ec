"""Strict HTTP/1.1 request framing: where a request ends is never open to interpretation.

A server that accepts malformed framing can disagree with a proxy in front of it about where a
request ends, and then takes the rest for a second request (request smuggling). A real
appliance on raw sockets: every malformed body is refused with 400 and the connection closed,
so nothing after it is read as another request.
"""

from __future__ import annotations

import socket

import httpx
import pytest

from eagle3_appliance.launch import ServerProcess

HEAD = "POST /model_info HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
# A request smuggled behind the malformed one: it must never be answered.
SMUGGLED = b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n"


def _exchange(url: str, raw: bytes) -> bytes:
    """Send ``raw`` on a fresh connection; everything the server sends until it closes (10 s at most)."""
    parsed = httpx.URL(url)
    with socket.create_connection((parsed.host, parsed.port), timeout=10) as sock:
        sock.sendall(raw)
        data = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not chunk:
                break
            data += chunk
    return data


def _statuses(data: bytes) -> list[int]:
    return [int(line.split()[1]) for line in data.split(b"\r\n") if line.startswith(b"HTTP/1.1 ")]


def test_a_well_formed_chunked_body_is_accepted(server: ServerProcess) -> None:
    raw = (
        HEAD + "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    ).encode() + b"2;name=value\r\n{}\r\n0\r\n\r\n"
    assert _statuses(_exchange(server.url, raw)) == [200]


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"2\r\n{}XX0\r\n\r\n", id="chunk-data-not-followed-by-crlf"),
        pytest.param(b"2;" + b"x" * 100_000 + b"\r\n{}\r\n0\r\n\r\n", id="100-KB-chunk-extension"),
        pytest.param(b"2\r\n{}\r\n0\r\nX-Trailer: 1\r\n\r\n", id="trailer-section"),
        pytest.param(b"+2\r\n{}\r\n0\r\n\r\n", id="signed-chunk-size"),
    ],
)
def test_a_malformed_chunked_body_is_refused_and_the_connection_closed(server: ServerProcess, body: bytes) -> None:
    raw = (HEAD + "Transfer-Encoding: chunked\r\n\r\n").encode() + body + SMUGGLED
    data = _exchange(server.url, raw)
    assert _statuses(data) == [400], data[:300]


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param("Transfer-Encoding: chunked\r\nContent-Length: 2\r\n", id="chunked-and-content-length"),
        pytest.param("Transfer-Encoding: gzip\r\nContent-Length: 2\r\n", id="unsupported-coding"),
        pytest.param("Transfer-Encoding: chunked, chunked\r\n", id="chunked-twice"),
        pytest.param("Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n", id="two-headers"),
        pytest.param("Content-Length: 2\r\nContent-Length: 3\r\n", id="two-content-lengths"),
        pytest.param("Content-Length: \u0662\r\n", id="content-length-in-another-script"),
    ],
)
def test_ambiguous_framing_headers_are_refused_and_the_connection_closed(server: ServerProcess, headers: str) -> None:
    raw = (HEAD + headers + "\r\n").encode("utf-8") + b"2\r\n{}\r\n0\r\n\r\n" + SMUGGLED
    data = _exchange(server.url, raw)
    assert _statuses(data) == [400], data[:300]
