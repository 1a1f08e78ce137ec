"""Control-plane bodies are small: a JSON endpoint refuses a large body before reading it.

A 50 MB ``/session`` offer used to be read whole and parsed on the event loop (``/health/live``
waited seconds), and a bad value in it was echoed whole in the ``422``. A real appliance over
loopback: JSON endpoints answer ``413`` above :data:`eagle3_client.protocol.MAX_JSON_BODY_BYTES`
(at the head for a Content-Length, as soon as a chunked body passes it), probes keep answering
meanwhile, ``422`` messages quote a short prefix of a bad value, and the wire-body endpoints
keep ``--max-body-bytes``.
"""

from __future__ import annotations

import socket
import threading

import httpx
import pytest

from eagle3_appliance.launch import ServerProcess
from eagle3_client import protocol
from tests.test_http_framing import _exchange, _statuses

BIG = 50_000_000  # bytes of the offers below: well under --max-body-bytes (64 MiB)
CHUNK = 512 * 1024


def _connect(url: str) -> socket.socket:
    parsed = httpx.URL(url)
    return socket.create_connection((parsed.host, parsed.port), timeout=10)


def _read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes (each read waits 10 s at most)."""
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except (TimeoutError, ConnectionResetError):
            return data
        if not chunk:
            return data
        data += chunk


def test_a_large_declared_control_body_is_refused_at_its_head(server: ServerProcess) -> None:
    head = f"POST /session HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {BIG}\r\n\r\n"
    data = _exchange(server.url, head.encode())  # not one byte of the body is sent
    assert _statuses(data) == [413], data[:300]
    assert b"at most 1048576 bytes" in data, data[:300]


def test_a_large_chunked_offer_is_cut_off_and_probes_answer_meanwhile(server: ServerProcess) -> None:
    offer_start = b'{"client": "big", "capabilities": ["' + b"x" * (CHUNK - 37)
    first_sent = threading.Event()
    go_on = threading.Event()
    sent: list[int] = []

    with _connect(server.url) as sock:

        def send() -> None:
            head = b"POST /session HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            sock.sendall(head + b"%x\r\n%s\r\n" % (len(offer_start), offer_start))
            first_sent.set()
            go_on.wait(60)
            filler = b"%x\r\n%s\r\n" % (CHUNK, b"x" * CHUNK)
            try:
                for _ in range(BIG // CHUNK):  # the rest of a 50 MB offer, unless the server stops reading
                    sock.sendall(filler)
                    sent.append(CHUNK)
                sock.sendall(b'3\r\n"]}\r\n0\r\n\r\n')
            except OSError:
                pass  # the server closed the connection: expected once it has refused the body

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        assert first_sent.wait(60)
        with httpx.Client(base_url=server.url, trust_env=False, timeout=30) as http:
            live = http.get(protocol.path(protocol.EP_HEALTH_LIVE))  # the big offer is half sent
            assert (live.status_code, live.json()) == (200, {"status": "live"})
            go_on.set()
            data = _read_all(sock)
            sender.join(60)
            assert _statuses(data) == [413], data[:300]
            assert b"larger than this endpoint's limit of 1048576 bytes" in data, data[:300]
            assert sum(sent) < BIG // 2  # the server stopped reading long before the end
            live = http.get(protocol.path(protocol.EP_HEALTH_LIVE))
            assert (live.status_code, live.json()) == (200, {"status": "live"})


CONTROL_POSTS = [
    protocol.EP_SESSION,
    protocol.EP_MODEL_INFO,
    protocol.EP_HEARTBEAT,
    protocol.EP_DISCONNECT,
    protocol.EP_DATA_PLANE,
    protocol.EP_DATA_PLANE_RESEND,
    protocol.EP_INIT_NCCL,
]


@pytest.mark.parametrize("endpoint", CONTROL_POSTS)
def test_every_json_endpoint_refuses_a_body_above_the_control_limit(server: ServerProcess, endpoint: str) -> None:
    body = b"x" * (protocol.MAX_JSON_BODY_BYTES + 1)
    resp = httpx.post(server.url + protocol.path(endpoint), content=body, timeout=30, trust_env=False)
    assert resp.status_code == 413, resp.text[:300]
    assert resp.json() == {
        "error": f"a /{endpoint} body may be at most {protocol.MAX_JSON_BODY_BYTES} bytes; this one declares {len(body)}",
        "type": "BodyTooLarge",
        "status": 413,
    }


@pytest.mark.parametrize("endpoint", sorted(protocol.WIRE_BODY_ENDPOINTS))
def test_wire_body_endpoints_keep_the_large_limit(server: ServerProcess, endpoint: str) -> None:
    """A 2 MiB wire body is read and decoded (400: it is garbage), not refused for its size."""
    body = b"x" * (2 * protocol.MAX_JSON_BODY_BYTES)
    resp = httpx.post(server.url + protocol.path(endpoint), content=body, timeout=60, trust_env=False)
    if endpoint == protocol.EP_STREAM_PRODUCE:  # read, then refused for what it lacks: a stream session
        assert resp.status_code == 409 and "'stream' capability" in resp.json()["error"], resp.text[:300]
        return
    assert resp.status_code == 400, resp.text[:300]
    assert "malformed wire body" in resp.json()["error"]


def test_a_bad_value_is_quoted_briefly_in_the_422(server: ServerProcess) -> None:
    huge = "x" * 900_000
    resp = httpx.post(
        server.url + protocol.path(protocol.EP_SESSION),
        json={"client": "bad", "capabilities": [huge, 1]},
        timeout=30,
        trust_env=False,
    )
    assert resp.status_code == 422, resp.text[:300]
    assert len(resp.content) < 600
    error = resp.json()["error"]
    assert error.startswith("'capabilities' must be a list of strings, got ['xxxx")
    assert error.endswith(f"... ({len(repr([huge, 1]))} characters)")
