"""Hostile or careless connections: total header and body deadlines, the connection cap, body memory.

Real appliance processes and raw sockets. Limits are lowered with the server's own options so
that a handful of connections and a few seconds show what 1,100 connections or a 60 MB body
would: a dribbling client is closed at its deadline, the cap keeps a way in for health probes
(and is logged), and bodies that are withheld neither stay open nor pile up in memory.
"""

from __future__ import annotations

import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from eagle3_appliance.launch import ServerProcess
from eagle3_appliance.serving.connections import FD_RESERVE, PROBE_SLOTS
from tests.ops_support import metric, scrape, server, wait_until

HEADER_TIMEOUT = 2.0
BODY_TIMEOUT = 3.0
TOKEN = "connections-test-token"
MB = 1024 * 1024


def _connect(url: str) -> socket.socket:
    parsed = httpx.URL(url)
    sock = socket.create_connection((parsed.host, parsed.port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _read_until_closed(sock: socket.socket, limit_s: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection (or ``limit_s`` passes); and when."""
    start = time.monotonic()
    data = b""
    sock.settimeout(0.2)
    while time.monotonic() - start < limit_s:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    return data, time.monotonic() - start


def _is_closed(sock: socket.socket) -> bool:
    sock.settimeout(0.05)
    try:
        return sock.recv(65536) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _get(sock: socket.socket, path: str, headers: str = "") -> bytes:
    """One keep-alive GET on ``sock``; the response head and body (small JSON)."""
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n{headers}\r\n".encode())
    sock.settimeout(10)
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(h.split(b":")[1] for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")))
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


@pytest.fixture(scope="module")
def deadlines(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("deadlines")
    args = [
        "--cache-dir", str(cache_dir),
        "--header-timeout", str(HEADER_TIMEOUT),
        "--body-timeout", str(BODY_TIMEOUT),
        "--keep-alive-timeout", "3",
        "--auth-token", TOKEN,
        "--max-body-bytes", str(32 * MB),
        "--max-pending-body-bytes", str(32 * MB),
    ]  # fmt: skip
    with server(args, {}, tmp / "server.log") as proc:
        yield proc


def test_dribbled_headers_are_closed_at_the_header_deadline(deadlines: ServerProcess) -> None:
    sock = _connect(deadlines.url)
    start = time.monotonic()
    line = b"GET /health/live HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200
    received = b""
    sock.settimeout(0.1)
    for byte in line:  # one byte every 0.25 s: each byte would restart a per-byte timeout
        if time.monotonic() - start > 4 * HEADER_TIMEOUT:
            break
        try:
            sock.send(bytes([byte]))
        except OSError:
            break
        time.sleep(0.25)
        try:
            received += sock.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            break
        if received:
            break
    rest, _ = _read_until_closed(sock, 5)
    elapsed = time.monotonic() - start
    sock.close()
    assert (received + rest).startswith(b"HTTP/1.1 408"), received + rest
    assert b"headers were not received within 2 s" in received + rest
    assert elapsed < HEADER_TIMEOUT + 3, elapsed


def test_a_silent_connection_is_closed_at_the_header_deadline(deadlines: ServerProcess) -> None:
    sock = _connect(deadlines.url)
    data, elapsed = _read_until_closed(sock, 4 * HEADER_TIMEOUT)
    sock.close()
    assert data == b"" and elapsed < HEADER_TIMEOUT + 3, (data, elapsed)


def test_a_busy_keep_alive_connection_outlives_the_header_deadline(deadlines: ServerProcess) -> None:
    """The deadline is per request: many quick requests on one connection are never cut."""
    sock = _connect(deadlines.url)
    start = time.monotonic()
    answers = 0
    while time.monotonic() - start < 2.5 * HEADER_TIMEOUT:
        assert _get(sock, "/health/live").startswith(b"HTTP/1.1 200"), answers
        answers += 1
        time.sleep(0.2)
    # Idle afterwards: closed after the keep-alive (3 s), not before the request deadline's worth.
    _, idle = _read_until_closed(sock, 10)
    sock.close()
    assert answers >= 10 and 2.0 < idle < 3 + 3, (answers, idle)


def _withhold(url: str, declared: int, sent: int, token: str | None) -> socket.socket:
    """A POST /generate that declares ``declared`` bytes and sends ``sent`` of them, then stops."""
    sock = _connect(url)
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    head = (
        f"POST /generate HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/octet-stream\r\n"
        f"Content-Length: {declared}\r\n\r\n"
    )
    sock.sendall(head.encode())
    chunk = b"\0" * MB
    sock.settimeout(10)
    try:
        for _ in range(sent // MB):
            sock.sendall(chunk)
    except OSError:
        pass  # the server may already have answered and closed
    return sock


def test_an_unauthenticated_withheld_body_is_never_held_and_is_cut_at_the_deadline(deadlines: ServerProcess) -> None:
    assert deadlines.proc is not None
    rss_before = _rss_bytes(deadlines.proc.pid)
    start = time.monotonic()
    sock = _withhold(deadlines.url, 30 * MB, 24 * MB, token=None)
    rss_during = _rss_bytes(deadlines.proc.pid)
    data, _ = _read_until_closed(sock, 4 * BODY_TIMEOUT)
    elapsed = time.monotonic() - start
    sock.close()
    assert data.startswith(b"HTTP/1.1 401"), data[:200]
    assert elapsed < BODY_TIMEOUT + 4, elapsed  # the rest of the body was awaited for the deadline only
    assert rss_during - rss_before < 8 * MB, (rss_before, rss_during)  # the 24 MB were read and dropped


def test_withheld_bodies_are_bounded_by_the_body_budget_and_cut_at_the_deadline(deadlines: ServerProcess) -> None:
    assert deadlines.proc is not None
    before = scrape(deadlines.url, headers={"Authorization": f"Bearer {TOKEN}"})
    rss_before = _rss_bytes(deadlines.proc.pid)
    start = time.monotonic()
    # The budget (32 MB) admits one 30 MB body; the other three are refused before being read.
    socks = [_withhold(deadlines.url, 30 * MB, 24 * MB, token=TOKEN) for _ in range(4)]
    rss_during = _rss_bytes(deadlines.proc.pid)
    answers = [_read_until_closed(sock, 4 * BODY_TIMEOUT)[0] for sock in socks]
    elapsed = time.monotonic() - start
    for sock in socks:
        sock.close()
    statuses = sorted(a[:12].decode(errors="replace") for a in answers)
    assert statuses == ["HTTP/1.1 408"] + ["HTTP/1.1 503"] * 3, [a[:300] for a in answers]
    assert any(b"--max-pending-body-bytes" in a for a in answers)
    assert elapsed < BODY_TIMEOUT + 6, elapsed
    # One withheld body (24 MB) may be in memory, never four (96 MB).
    assert rss_during - rss_before < 48 * MB, (rss_before, rss_during)
    after = scrape(deadlines.url, headers={"Authorization": f"Bearer {TOKEN}"})
    assert (
        metric(after, "eagle3_connections_refused_total", reason="body_budget")
        - metric(before, "eagle3_connections_refused_total", reason="body_budget")
        == 3
    )
    assert metric(after, "eagle3_pending_body_bytes") == 0


# -- the connection cap ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def capped(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, Path]]:
    log = tmp_path_factory.mktemp("capped") / "server.log"
    args = ["--cache-dir", str(cache_dir), "--max-connections", "8", "--header-timeout", "60"]
    with server(args, {}, log) as proc:
        yield proc, log


def _partial_request(url: str) -> socket.socket:
    """A connection with a request under way (headers not finished): busy, not idle."""
    sock = _connect(url)
    sock.sendall(b"GET /health/live HTTP/1.1\r\nHost: x\r\n")
    return sock


def test_idle_connections_make_room_for_new_ones_at_the_cap(capped: tuple[ServerProcess, Path]) -> None:
    proc, _ = capped
    idle = [_connect(proc.url) for _ in range(8)]
    for sock in idle:
        assert _get(sock, "/health/live").startswith(b"HTTP/1.1 200")  # accepted, now idle
    answer = httpx.get(proc.url + "/model_info", trust_env=False, timeout=10)
    assert answer.status_code == 200
    assert _read_until_closed(idle[0], 5)[0] == b""  # the longest idle made room
    assert not any(_is_closed(sock) for sock in idle[2:])
    for sock in idle:
        sock.close()


def test_at_the_cap_probes_still_answer_and_the_cap_is_logged(capped: tuple[ServerProcess, Path]) -> None:
    proc, log = capped
    wait_until(lambda: metric(scrape(proc.url), "eagle3_open_connections") == 1, what="earlier connections to close")
    busy = [_partial_request(proc.url) for _ in range(8)]
    try:
        time.sleep(0.5)  # accepted and past their first bytes
        live = httpx.get(proc.url + "/health/live", trust_env=False, timeout=10)
        assert live.status_code == 200 and live.headers["connection"] == "close"
        refused = httpx.get(proc.url + "/model_info", trust_env=False, timeout=10)
        assert refused.status_code == 503 and "--max-connections" in refused.json()["error"]
        # Both probe slots taken: the next connection is answered 503 at once and closed.
        time.sleep(0.3)  # the two probe connections above have been closed by the server
        slots = [_partial_request(proc.url) for _ in range(PROBE_SLOTS)]
        time.sleep(0.3)
        extra = _connect(proc.url)
        data, elapsed = _read_until_closed(extra, 5)
        extra.close()
        assert data.startswith(b"HTTP/1.1 503") and b"too many connections" in data and elapsed < 2, data
        for sock in slots:
            sock.close()
    finally:
        for sock in busy:
            sock.close()
    wait_until(lambda: httpx.get(proc.url + "/model_info", trust_env=False, timeout=10).status_code == 200)
    s = scrape(proc.url)
    assert metric(s, "eagle3_connections_refused_total", reason="connections") >= 1
    assert metric(s, "eagle3_connections_refused_total", reason="probe_only") >= 1
    assert "connection cap reached: " in log.read_text()


def test_a_server_at_its_descriptor_limit_keeps_answering_probes(cache_dir: Path, tmp_path: Path) -> None:
    """With only 128 descriptors (soft = hard, so not raisable) and 150 idle connections."""
    limit = 128
    launcher = (
        sys.executable,
        "-c",
        f"import resource, runpy, sys; resource.setrlimit(resource.RLIMIT_NOFILE, ({limit}, {limit})); "
        "sys.argv[0] = 'eagle3_appliance'; runpy.run_module('eagle3_appliance', run_name='__main__')",
    )
    log = tmp_path / "server.log"
    proc = ServerProcess(["--cache-dir", str(cache_dir)], log_path=log, launcher=launcher)
    with proc:
        idle = []
        try:
            for _ in range(150):
                idle.append(_connect(proc.url))
            time.sleep(1.0)
            probes = [httpx.get(proc.url + "/health/live", trust_env=False, timeout=5).status_code for _ in range(5)]
            assert probes == [200] * 5
            assert httpx.get(proc.url + "/model_info", trust_env=False, timeout=5).status_code == 200
        finally:
            for sock in idle:
                sock.close()
    text = log.read_text()
    assert f"the open-file limit is {limit}: at most {limit - FD_RESERVE - PROBE_SLOTS} client connections" in text
    assert "connection cap reached: " in text
