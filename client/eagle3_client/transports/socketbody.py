"""An httpx transport whose response bodies can be received with ``recv_into``.

Why: httpx reads a body as 64 KiB ``bytes`` chunks that h11 copies through its own buffer;
for a 300 MB ``/generate`` answer that is three copies and ~5 000 trips through the HTTP
state machine, measured at well under half of what the loopback socket moves. This
transport speaks just enough HTTP/1.1 (keep-alive, Content-Length, chunked, read-to-close)
to hand the caller the body as a :class:`SocketBody` whose :meth:`SocketBody.readinto`
receives straight into the caller's memory, so the kernel's copy is the only one.

Only requests that carry the :data:`RECV_INTO` extension over plain ``http://`` take this
path; everything else goes to the fallback (httpx's own transport). Errors are raised as
the httpx exceptions httpx itself would raise (``ConnectError``, ``ReadTimeout``,
``RemoteProtocolError``...), so retry and error-mapping code above it is unchanged.

Usage::

    client = httpx.Client(transport=SocketTransport())
    with client.stream("POST", url, content=body, extensions={RECV_INTO: True}) as resp:
        body = resp.extensions[BODY]      # a SocketBody
        n = body.readinto(memoryview(buf))
"""

from __future__ import annotations

import socket
import threading
import weakref
from collections.abc import Iterator

import httpx

__all__ = ["BODY", "RECV_INTO", "SocketBody", "SocketTransport"]

RECV_INTO = "eagle3.recv_into"  # request extension: route through SocketTransport
BODY = "eagle3.body"  # response extension: the SocketBody to readinto from

_MAX_HEAD = 64 * 1024  # longest response head accepted
_MAX_LINE = 4096  # longest chunk-size or trailer line accepted
_READ = 64 * 1024  # read size for heads, chunk lines and iterated bodies


class SocketBody(httpx.SyncByteStream):
    """One response body on a socket, framed by Content-Length, chunks or connection close.

    :meth:`readinto` fills part of a caller's buffer (0 means the body has ended); iterating
    yields ``bytes`` chunks for callers that just want the content. :meth:`close` hands the
    socket back for reuse if the body was read to its end on a keep-alive connection.
    """

    def __init__(
        self,
        transport: SocketTransport,
        key: tuple[str, int],
        sock: socket.socket,
        request: httpx.Request,
        leftover: bytes,
        *,
        length: int | None,
        chunked: bool,
        keep_alive: bool,
    ) -> None:
        self._transport = transport
        self._key = key
        self._sock: socket.socket | None = sock
        self._request = request
        self._buffered = bytearray(leftover)
        self._length_left = length
        self._chunked = chunked
        self._chunk_left = 0
        self._chunk_seen = False
        self._keep_alive = keep_alive and (chunked or length is not None)
        self._done = length == 0 and not chunked

    @property
    def done(self) -> bool:
        return self._done

    def readinto(self, view: memoryview) -> int:
        """Receive up to ``len(view)`` body bytes into ``view``; 0 once the body has ended."""
        if self._done or not view.nbytes:
            return 0
        if self._chunked:
            if self._chunk_left == 0 and not self._next_chunk():
                return 0
            n = self._recv_into(view[: self._chunk_left], required=True)
            self._chunk_left -= n
            return n
        if self._length_left is None:  # read to close
            n = self._recv_into(view, required=False)
            self._done = n == 0
            return n
        n = self._recv_into(view[: self._length_left], required=True)
        self._length_left -= n
        self._done = self._length_left == 0
        return n

    def __iter__(self) -> Iterator[bytes]:
        buf = bytearray(_READ)
        view = memoryview(buf)
        while n := self.readinto(view):
            yield bytes(view[:n])

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is None:
            return
        self._transport._finished(sock)
        if self._done and self._keep_alive and not self._buffered:
            self._transport._release(self._key, sock)
        else:
            sock.close()

    # -- framing -----------------------------------------------------------------------

    def _next_chunk(self) -> bool:
        """Read the next chunk header; False (and done) after the last chunk and trailers."""
        if self._chunk_seen and self._read_line() != b"":
            raise httpx.RemoteProtocolError("chunk data is not followed by CRLF", request=self._request)
        self._chunk_seen = True
        line = self._read_line()
        try:
            size = int(line.split(b";", 1)[0].strip(), 16)
        except ValueError:
            raise httpx.RemoteProtocolError(f"bad chunk size line {line[:40]!r}", request=self._request) from None
        if size < 0:
            raise httpx.RemoteProtocolError("negative chunk size", request=self._request)
        if size == 0:
            while self._read_line() != b"":  # trailers, ignored
                pass
            self._done = True
            return False
        self._chunk_left = size
        return True

    def _read_line(self) -> bytes:
        while True:
            end = self._buffered.find(b"\r\n")
            if end >= 0:
                line = bytes(self._buffered[:end])
                del self._buffered[: end + 2]
                return line
            if len(self._buffered) > _MAX_LINE:
                raise httpx.RemoteProtocolError("chunked framing line too long", request=self._request)
            more = _recv(self._live(), _READ, self._request)
            if not more:
                raise _early_eof(self._request)
            self._buffered += more

    def _recv_into(self, view: memoryview, *, required: bool) -> int:
        if self._buffered:
            n = min(view.nbytes, len(self._buffered))
            view[:n] = self._buffered[:n]
            del self._buffered[:n]
            return n
        sock = self._live()
        try:
            n = sock.recv_into(view)
        except TimeoutError as exc:
            raise httpx.ReadTimeout(str(exc) or "timed out reading the response body", request=self._request) from exc
        except OSError as exc:
            raise httpx.ReadError(str(exc), request=self._request) from exc
        if n == 0 and required:
            raise _early_eof(self._request)
        return n

    def _live(self) -> socket.socket:
        if self._sock is None:
            raise httpx.StreamClosed()
        return self._sock


class SocketTransport(httpx.BaseTransport):
    """Plain-HTTP/1.1 keep-alive transport for :data:`RECV_INTO` requests; others go to ``fallback``.

    **Parameters:**

    * ``fallback`` - transport for every other request (default: ``httpx.HTTPTransport()``).
    * ``max_idle`` - keep-alive sockets kept per host and port.
    """

    def __init__(self, fallback: httpx.BaseTransport | None = None, *, max_idle: int = 4) -> None:
        self._fallback = fallback if fallback is not None else httpx.HTTPTransport()
        self._max_idle = max_idle
        self._idle: dict[tuple[str, int], list[socket.socket]] = {}
        self._busy: set[socket.socket] = set()  # carrying a request or its answer now (abort() ends them)
        self._aborted: weakref.WeakSet[socket.socket] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._closed = False

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if not request.extensions.get(RECV_INTO) or request.url.scheme != "http":
            return self._fallback.handle_request(request)
        timeouts = request.extensions.get("timeout", {})
        key = (request.url.host, request.url.port or 80)
        head = _serialize(request)
        sock = self._idle_socket(key)
        if sock is not None:
            try:
                return self._exchange(key, sock, request, head, timeouts)
            except (httpx.WriteError, httpx.RemoteProtocolError, httpx.ReadError) as exc:
                if getattr(exc, "_eagle3_response_started", True) or self._was_aborted(sock):
                    raise
                # The server closed an idle keep-alive connection: retry once on a new one.
        sock = _connect(key, timeouts.get("connect"), request)
        return self._exchange(key, sock, request, head, timeouts)

    def abort(self) -> int:
        """End every exchange in flight now (a thread blocked on its answer gets a ``ReadError``
        or ``RemoteProtocolError`` at once); how many. For a server that stopped answering."""
        with self._lock:
            busy, self._busy = self._busy, set()
            for sock in busy:
                self._aborted.add(sock)
        for sock in busy:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes a blocked recv; close() alone would not
            except OSError:
                pass
        return len(busy)

    def _finished(self, sock: socket.socket) -> None:
        with self._lock:
            self._busy.discard(sock)

    def _was_aborted(self, sock: socket.socket) -> bool:
        with self._lock:
            if sock in self._aborted:
                self._aborted.discard(sock)
                return True
            return False

    def _exchange(
        self, key: tuple[str, int], sock: socket.socket, request: httpx.Request, head: bytes, timeouts: dict
    ) -> httpx.Response:
        with self._lock:
            self._busy.add(sock)
        try:
            sock.settimeout(timeouts.get("write"))
            try:
                sock.sendall(head)
                body = request.read()
                if body:
                    sock.sendall(body)
            except TimeoutError as exc:
                raise httpx.WriteTimeout(str(exc) or "timed out sending the request", request=request) from exc
            except OSError as exc:
                raise _not_started(httpx.WriteError(str(exc), request=request)) from exc
            sock.settimeout(timeouts.get("read"))
            status, reason, headers, leftover = _read_head(sock, request)
        except BaseException:
            self._finished(sock)
            sock.close()
            raise
        fields = {name.lower(): value for name, value in headers}
        chunked = b"chunked" in fields.get(b"transfer-encoding", b"").lower()
        length = None
        if not chunked and b"content-length" in fields:
            try:
                length = int(fields[b"content-length"])
            except ValueError:
                self._finished(sock)
                sock.close()
                raise httpx.RemoteProtocolError("bad Content-Length", request=request) from None
        if status in (204, 304) or 100 <= status < 200:
            length, chunked = 0, False
        keep_alive = fields.get(b"connection", b"").lower() != b"close"
        body_stream = SocketBody(
            self, key, sock, request, leftover, length=length, chunked=chunked, keep_alive=keep_alive
        )
        return httpx.Response(
            status,
            headers=headers,
            stream=body_stream,
            extensions={"http_version": b"HTTP/1.1", "reason_phrase": reason, BODY: body_stream},
        )

    def _idle_socket(self, key: tuple[str, int]) -> socket.socket | None:
        with self._lock:
            idle = self._idle.get(key, [])
            while idle:
                sock = idle.pop()
                if _still_idle(sock):
                    return sock
                sock.close()
        return None

    def _release(self, key: tuple[str, int], sock: socket.socket) -> None:
        with self._lock:
            idle = self._idle.setdefault(key, [])
            if self._closed or len(idle) >= self._max_idle:
                sock.close()
            else:
                idle.append(sock)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for idle in self._idle.values():
                for sock in idle:
                    sock.close()
            self._idle.clear()
        self._fallback.close()


def _still_idle(sock: socket.socket) -> bool:
    """True when a kept-alive socket is open with nothing to read, so it can carry a request.

    Anything readable while idle means the server closed it (EOF) or sent junk. A
    non-blocking peek rather than ``select.select``, which raises ``ValueError`` for
    descriptor numbers above 1023 (a trainer with data-loader workers and NCCL gets there).
    """
    timeout = sock.gettimeout()
    sock.settimeout(0.0)  # non-blocking: Python would otherwise wait for readability first
    try:
        sock.recv(1, socket.MSG_PEEK)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        sock.settimeout(timeout)
    return False


def _not_started(exc: httpx.TransportError) -> httpx.TransportError:
    """Mark an error that happened before any response byte (safe to retry on a new socket)."""
    exc._eagle3_response_started = False  # type: ignore[attr-defined]
    return exc


def _early_eof(request: httpx.Request) -> httpx.RemoteProtocolError:
    return httpx.RemoteProtocolError("peer closed connection without sending complete message body", request=request)


def _connect(key: tuple[str, int], timeout: float | None, request: httpx.Request) -> socket.socket:
    try:
        sock = socket.create_connection(key, timeout=timeout)
    except TimeoutError as exc:
        raise httpx.ConnectTimeout(str(exc) or "timed out connecting", request=request) from exc
    except OSError as exc:
        raise httpx.ConnectError(str(exc), request=request) from exc
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _serialize(request: httpx.Request) -> bytes:
    """Request line and headers. The body is sent raw, so no content coding is accepted."""
    lines = [b"%s %s HTTP/1.1" % (request.method.encode("ascii"), request.url.raw_path)]
    for name, value in request.headers.raw:
        if name.lower() != b"accept-encoding":
            lines.append(name + b": " + value)
    lines.append(b"Accept-Encoding: identity")
    return b"\r\n".join(lines) + b"\r\n\r\n"


def _recv(sock: socket.socket, size: int, request: httpx.Request) -> bytes:
    try:
        return sock.recv(size)
    except TimeoutError as exc:
        raise httpx.ReadTimeout(str(exc) or "timed out waiting for the response", request=request) from exc
    except OSError as exc:
        raise httpx.ReadError(str(exc), request=request) from exc


def _read_head(sock: socket.socket, request: httpx.Request) -> tuple[int, bytes, list[tuple[bytes, bytes]], bytes]:
    """Status, reason, headers and the body bytes already received; 1xx answers are skipped."""
    buf = b""
    started = False
    while True:
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > _MAX_HEAD:
                raise httpx.RemoteProtocolError("response head too long", request=request)
            try:
                more = _recv(sock, _READ, request)
            except httpx.ReadError as exc:  # e.g. reset: a stale keep-alive socket if nothing came yet
                if not started:
                    _not_started(exc)
                raise
            if not more:
                closed = httpx.RemoteProtocolError("Server disconnected without sending a response.", request=request)
                raise closed if started else _not_started(closed)
            started = True
            buf += more
            continue
        lines = buf[:end].split(b"\r\n")
        buf = buf[end + 4 :]
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            raise httpx.RemoteProtocolError(f"bad status line {lines[0][:80]!r}", request=request)
        status = int(parts[1])
        headers: list[tuple[bytes, bytes]] = []
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep:
                raise httpx.RemoteProtocolError(f"bad header line {line[:80]!r}", request=request)
            headers.append((name.strip(), value.strip()))
        if 100 <= status < 200 and status != 101:
            continue
        if parts[0] == b"HTTP/1.0":
            fields = {n.lower(): v.lower() for n, v in headers}
            if fields.get(b"connection") != b"keep-alive":
                headers.append((b"Connection", b"close"))
        reason = parts[2] if len(parts) > 2 else b""
        return status, reason, headers, buf
