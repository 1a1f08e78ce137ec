"""SocketTransport against a scripted HTTP/1.1 server on 127.0.0.1: framing, keep-alive, errors."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable

import httpx
import pytest
import torch

from eagle3_client import wire
from eagle3_client.errors import TargetHTTPError, TargetTimeout
from eagle3_client.transports.control import ControlPlane
from eagle3_client.transports.socketbody import BODY, RECV_INTO, SocketTransport

# A reply script: given the connection and the request head, write a response; return
# whether the connection stays open for the next request.
Reply = Callable[[socket.socket, bytes], bool]


class ScriptedServer:
    """Answers each request on 127.0.0.1 with the next reply of its script; counts connections."""

    def __init__(self, replies: list[Reply]) -> None:
        self.replies = list(replies)
        self.connections = 0
        self.heads: list[bytes] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while self.replies:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self.connections += 1
            with conn:
                while self.replies:
                    head = _read_request(conn)
                    if head is None:
                        break
                    self.heads.append(head)
                    if not self.replies.pop(0)(conn, head):
                        break

    def close(self) -> None:
        self.replies.clear()
        self._listener.close()
        self._thread.join(timeout=5)


def _read_request(conn: socket.socket) -> bytes | None:
    data = b""
    while b"\r\n\r\n" not in data:
        more = conn.recv(65536)
        if not more:
            return None
        data += more
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        body += conn.recv(65536)
    return head


def _length_reply(body: bytes, status: str = "200 OK", extra: bytes = b"") -> Reply:
    def reply(conn: socket.socket, _head: bytes) -> bool:
        conn.sendall(b"HTTP/1.1 %s\r\nContent-Length: %d\r\n%s\r\n" % (status.encode(), len(body), extra) + body)
        return True

    return reply


def _chunked_reply(body: bytes, piece: int) -> Reply:
    def reply(conn: socket.socket, _head: bytes) -> bool:
        out = [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"]
        for start in range(0, len(body), piece):
            chunk = body[start : start + piece]
            out.append(b"%x;ext=1\r\n%s\r\n" % (len(chunk), chunk))
        out.append(b"0\r\nX-Trailer: yes\r\n\r\n")
        conn.sendall(b"".join(out))
        return True

    return reply


def _close_delimited_reply(body: bytes) -> Reply:
    def reply(conn: socket.socket, _head: bytes) -> bool:
        conn.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + body)
        return False

    return reply


def _truncated_reply(body: bytes) -> Reply:
    def reply(conn: socket.socket, _head: bytes) -> bool:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body[: len(body) // 2])
        return False

    return reply


def _close_without_reply(conn: socket.socket, _head: bytes) -> bool:
    return False


@pytest.fixture
def blob() -> tuple[dict[str, torch.Tensor], bytes]:
    tensors = {"aux_hidden_states": torch.randn(2, 300, 7), "mask": torch.ones(2, 300, 1, dtype=torch.bool)}
    return tensors, wire.encode(tensors)


def _control(url: str, **kwargs) -> ControlPlane:
    return ControlPlane(url, backoff=0.0, **kwargs)


def _assert_tensors(got: dict[str, torch.Tensor | None], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want)
    for key in want:
        assert torch.equal(got[key], want[key]), key


def test_content_length_bodies_reuse_one_keep_alive_connection(blob):
    tensors, body = blob
    server = ScriptedServer([_length_reply(body), _length_reply(body), _length_reply(body)])
    control = _control(server.url)
    try:
        for _ in range(3):
            _assert_tensors(control.post_wire("generate", b"x" * 10), tensors)
    finally:
        control.close()
        server.close()
    assert server.connections == 1
    request_line, *headers = server.heads[0].split(b"\r\n")
    assert request_line == b"POST /generate HTTP/1.1"
    assert b"Accept-Encoding: identity" in headers and b"Content-Length: 10" in headers


@pytest.mark.parametrize("piece", [1, 333, 1 << 20])
def test_chunked_bodies_decode(blob, piece: int):
    tensors, body = blob
    server = ScriptedServer([_chunked_reply(body, piece), _chunked_reply(body, piece)])
    control = _control(server.url)
    try:
        _assert_tensors(control.post_wire("generate"), tensors)
        _assert_tensors(control.post_wire("generate"), tensors)  # framing ended cleanly: reused
    finally:
        control.close()
        server.close()
    assert server.connections == 1


def test_close_delimited_body_decodes_and_is_not_reused(blob):
    tensors, body = blob
    server = ScriptedServer([_close_delimited_reply(body), _close_delimited_reply(body)])
    control = _control(server.url)
    try:
        _assert_tensors(control.post_wire("generate"), tensors)
        _assert_tensors(control.post_wire("generate"), tensors)
    finally:
        control.close()
        server.close()
    assert server.connections == 2


def test_error_status_carries_the_server_message():
    server = ScriptedServer([_length_reply(b'{"error": "no mapping"}', status="409 Conflict")])
    control = _control(server.url)
    try:
        with pytest.raises(TargetHTTPError) as info:
            control.post_wire("generate")
    finally:
        control.close()
        server.close()
    assert info.value.status == 409 and "no mapping" in str(info.value)


def test_idle_connection_closed_by_the_server_is_replaced_transparently(blob):
    tensors, body = blob

    def reply_then_close(conn: socket.socket, head: bytes) -> bool:
        _length_reply(body)(conn, head)
        return False  # the server drops the keep-alive connection after answering

    server = ScriptedServer([reply_then_close, _length_reply(body)])
    control = _control(server.url, max_retries=0)  # no retry budget: the transport must cope
    try:
        _assert_tensors(control.post_wire("generate"), tensors)
        _assert_tensors(control.post_wire("generate"), tensors)
    finally:
        control.close()
        server.close()
    assert server.connections == 2


def test_body_cut_short_is_retried_on_a_new_connection(blob):
    tensors, body = blob
    server = ScriptedServer([_truncated_reply(body), _close_without_reply, _length_reply(body)])
    control = _control(server.url, max_retries=2)
    try:
        _assert_tensors(control.post_wire("generate"), tensors)
    finally:
        control.close()
        server.close()
    assert server.connections == 3


def test_silent_server_times_out():
    listener = socket.create_server(("127.0.0.1", 0))  # accepts (backlog) but never answers
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    control = _control(url, timeout=0.3, max_retries=0)
    try:
        with pytest.raises(TargetTimeout):
            control.post_wire("generate")
    finally:
        control.close()
        listener.close()


def test_only_marked_requests_take_the_socket_path(blob):
    _, body = blob
    seen: list[httpx.Request] = []

    def fallback(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"status": "ok"})

    server = ScriptedServer([_length_reply(body)])
    client = httpx.Client(transport=SocketTransport(httpx.MockTransport(fallback)))
    try:
        assert client.post(server.url + "/heartbeat").json() == {"status": "ok"}
        with client.stream("POST", server.url + "/generate", extensions={RECV_INTO: True}) as resp:
            stream = resp.extensions[BODY]
            buf = bytearray(len(body) + 100)
            got = 0
            while n := stream.readinto(memoryview(buf)[got:]):
                got += n
    finally:
        client.close()
        server.close()
    assert [r.url.path for r in seen] == ["/heartbeat"]
    assert bytes(buf[:got]) == body
