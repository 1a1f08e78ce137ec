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
    """The status of each response in ``data``, read one after another by their Content-Length."""
    statuses = []
    while data:
        head, sep, rest = data.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        assert sep and lines[0].startswith(b"HTTP/1.1 "), data[:300]
        statuses.append(int(lines[0].split()[1]))
        fields = dict(line.lower().split(b": ", 1) for line in lines[1:])
        data = rest[int(fields.get(b"content-length", b"0")) :]
    return statuses


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


# A request head whose framing a proxy in front may read differently: Content-Length: 2 covers
# "{}", so SMUGGLED is a second request to a lenient parser and the tail of the body to a strict one.
BAD_HEADS = [
    pytest.param(HEAD + "Content-Length : 2\r\n\r\n", id="space-before-colon"),
    pytest.param(HEAD + "Content-Length\t: 2\r\n\r\n", id="tab-before-colon"),
    pytest.param(HEAD + "X-A: b\r\n Content-Length: 2\r\n\r\n", id="obs-fold-space"),
    pytest.param(HEAD + "X-A: b\r\n\tContent-Length: 2\r\n\r\n", id="obs-fold-tab"),
    pytest.param(HEAD + "Content-Length:\r\n 2\r\n\r\n", id="obs-folded-value"),
    pytest.param(HEAD + "X-A: b\nContent-Length: 2\r\n\r\n", id="bare-lf"),
    pytest.param(HEAD + "X-A: b\rContent-Length: 2\r\n\r\n", id="bare-cr"),
    pytest.param(HEAD + "X-\x00A: b\r\nContent-Length: 2\r\n\r\n", id="nul-in-name"),
    pytest.param(HEAD + "X-A: b\x00c\r\nContent-Length: 2\r\n\r\n", id="nul-in-value"),
    pytest.param(HEAD + "X-A: b\x01c\r\nContent-Length: 2\r\n\r\n", id="ctl-in-value"),
    pytest.param(HEAD + "X-A: b\x7fc\r\nContent-Length: 2\r\n\r\n", id="del-in-value"),
    pytest.param(HEAD + "X@A: b\r\nContent-Length: 2\r\n\r\n", id="non-token-name"),
    pytest.param(HEAD + ": b\r\nContent-Length: 2\r\n\r\n", id="empty-name"),
    pytest.param(HEAD + "X-A\r\nContent-Length: 2\r\n\r\n", id="line-without-colon"),
]


@pytest.mark.parametrize("head", BAD_HEADS)
def test_a_malformed_head_is_refused_and_the_connection_closed(server: ServerProcess, head: str) -> None:
    data = _exchange(server.url, head.encode("latin-1") + b"{}" + SMUGGLED)
    assert _statuses(data) == [400], data[:300]


def test_transfer_encoding_on_http_1_0_is_refused_and_the_connection_closed(server: ServerProcess) -> None:
    """RFC 9112 6.1: an HTTP/1.0 message with Transfer-Encoding has faulty framing, keep-alive or not."""
    head = HEAD.replace("HTTP/1.1", "HTTP/1.0") + "Connection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n"
    data = _exchange(server.url, head.encode() + b"2\r\n{}\r\n0\r\n\r\n" + SMUGGLED)
    assert _statuses(data) == [400], data[:300]


@pytest.mark.parametrize("method", ["{}GET", "GE\x00T", "G(E)T"])
def test_a_method_that_is_not_a_token_is_refused(server: ServerProcess, method: str) -> None:
    data = _exchange(server.url, f"{method} /health/live HTTP/1.1\r\nHost: x\r\n\r\n".encode("latin-1") + SMUGGLED)
    assert _statuses(data) == [400], data[:300]


def test_a_malformed_head_is_answered_with_what_is_wrong(server: ServerProcess) -> None:
    data = _exchange(server.url, (HEAD + "X-A: b\r\n Content-Length: 2\r\n\r\n{}").encode())
    assert b"obsolete line folding" in data, data[:300]


def test_well_formed_heads_with_every_allowed_byte_are_served(server: ServerProcess) -> None:
    """Optional whitespace around values, HTAB and obs-text inside them, every tchar in a name, HTTP/1.0."""
    head = (
        HEAD + "X-Spaces:  \tb c\t \r\nX-Text: caf\xe9\r\nX-!#$%&'*+-.^_`|~09az: 1\r\nContent-Length: 2\r\n"
        "Connection: keep-alive\r\n\r\n"
    )
    one_oh = "POST /model_info HTTP/1.0\r\nHost: x\r\nContent-Length: 2\r\n\r\n"
    data = _exchange(server.url, head.encode("latin-1") + b"{}" + one_oh.encode() + b"{}")
    assert _statuses(data) == [200, 200], data[:300]
