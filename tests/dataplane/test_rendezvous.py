"""The rendezvous under abuse: clients that never join, strangers who read the store, port scans.

Real processes throughout: the appliance, our client, and a stranger process that uses
torch's own ``TCPStore`` and ``ProcessGroupGloo`` the way an attacker who reaches the
data-plane ports would.
"""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from eagle3_appliance.core.inputs import VocabMapping
from eagle3_appliance.launch import ServerProcess
from eagle3_appliance.model.target import Target
from eagle3_client import protocol
from eagle3_client.transports import group_plane

from .helpers import assert_bit_exact, connect, expected, health, inputs, status, wait_for

ROOT = Path(__file__).resolve().parents[2]
STRANGER = Path(__file__).with_name("stranger.py")


def free_range(count: int) -> tuple[int, int]:
    """``count`` consecutive ports that were free a moment ago."""
    for _ in range(200):
        first = random.randint(20000, 30000)
        try:
            for port in range(first, first + count):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return first, first + count - 1
    raise RuntimeError("no free port range")


@contextmanager
def _two_ports(dp_cache: Path, logs: Path, timeout: float) -> Iterator[tuple[ServerProcess, int]]:
    first, last = free_range(2)
    args = ["--cache-dir", str(dp_cache), "--data-plane-ports", f"{first}-{last}", "--data-plane-timeout", str(timeout)]
    with ServerProcess(args, log_path=logs / "server.log") as proc:
        yield proc, first


@pytest.fixture(scope="module")
def two_port_server(dp_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, int]]:
    """Two rendezvous ports in all, and a short data-plane timeout."""
    with _two_ports(dp_cache, tmp_path_factory.mktemp("rendezvous"), 2) as server:
        yield server


@pytest.fixture(scope="module")
def guarded_server(dp_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, int]]:
    """Two rendezvous ports and a data-plane timeout long enough for a stranger to join in time."""
    with _two_ports(dp_cache, tmp_path_factory.mktemp("guarded"), 20) as server:
        yield server


def test_sessions_that_never_join_leave_no_port_behind(
    two_port_server: tuple[ServerProcess, int], reference: Target, mapping: VocabMapping
) -> None:
    server, first = two_port_server
    with httpx.Client(base_url=server.url, trust_env=False, timeout=30) as http:
        for i in range(5):
            offer = {"client": f"never-joins-{i}", "data_planes": ["gloo", "wire"]}
            sid = http.post("/session", json=offer).json()["session_id"]
            reply = http.post(
                "/data_plane", json={"tier": "gloo", "proof": True}, headers={protocol.SESSION_HEADER: sid}
            )
            assert reply.status_code == 200, (i, reply.text)
            assert first <= reply.json()["port"] <= first + 1
            # Each waits out the server's --data-plane-timeout (2 s) and its link fails.
            wait_for(lambda sid=sid: status(server.url, sid)["session"]["state"] == "failed", "the rendezvous timeout")
    batch_inputs = inputs(reference, 2, 20, seed=1100)
    with connect(server.url, mapping, data_plane="gloo") as remote:
        assert_bit_exact(remote.generate_batch(*batch_inputs), expected(reference, mapping, batch_inputs))
        stats = remote.transport_stats()[0]
        assert (stats["tier"], stats["fallbacks"]) == ("gloo", 0)
        assert first <= stats["port"] <= first + 1
    assert len(status(server.url)["recently_closed"]) >= 5
    assert health(server.url) == 200


def _read_until(proc: subprocess.Popen[str], markers: tuple[str, ...], lines: list[str]) -> str:
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if line.startswith(markers):
            return line
    raise AssertionError(f"the stranger ended (code {proc.wait()}) before {markers!r}:\n{''.join(lines)[-3000:]}")


def _stranger_holds_the_group(url: str) -> bool:
    """The server's only rendezvous so far has a peer: it is checking its proof, or has rejected it."""
    links = status(url)
    return any(lk["state"] == "verifying" for lk in links["links"]) or any(
        lk["state"] == "rejected" for lk in links["recently_closed"]
    )


@pytest.mark.parametrize("mode", ["silent", "guess"])
def test_a_stranger_who_reads_the_store_gets_nothing_and_costs_the_client_seconds(
    guarded_server: tuple[ServerProcess, int],
    reference: Target,
    mapping: VocabMapping,
    monkeypatch: pytest.MonkeyPatch,
    mode: str,
) -> None:
    server, first = guarded_server
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    stranger = subprocess.Popen(
        [sys.executable, str(STRANGER), str(first), str(first + 1), mode],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    seen: list[str] = []
    replies: list[protocol.DataPlaneReply] = []
    real_from_json = protocol.DataPlaneReply.from_json
    real_connect = group_plane.connect_store

    def spy(body: Any) -> protocol.DataPlaneReply:
        reply = real_from_json(body)
        replies.append(reply)
        return reply

    def after_the_stranger(host: str, port: int, timeout: float) -> Any:
        """The worst case for our client: the stranger wins the race to the store."""
        if len(replies) == 1:
            _read_until(stranger, ("JOINED",), seen)
            assert stranger.stdin is not None
            stranger.stdin.write(f"{replies[0].nonce}\n")
            stranger.stdin.flush()
            # The stranger's group is up on its side; wait until the server's end is up with it
            # too, or our client (rank 1 as well) can still take the server's end first.
            wait_for(lambda: _stranger_holds_the_group(server.url), "the server's end of the stranger's group")
        return real_connect(host, port, timeout)

    monkeypatch.setattr(protocol.DataPlaneReply, "from_json", spy)
    monkeypatch.setattr(group_plane, "connect_store", after_the_stranger)
    batches = [inputs(reference, 2, 24, seed=1200 + i) for i in range(3)]
    try:
        options = dict(data_plane="gloo", data_plane_backoff=0, data_plane_connect_timeout=120)
        with connect(server.url, mapping, **options) as remote:
            start = time.monotonic()
            assert_bit_exact(remote.generate_batch(*batches[0]), expected(reference, mapping, batches[0]))
            first_answer_s = time.monotonic() - start
            # Not the 120 s connect timeout: the server rejects the stranger within seconds and says so.
            assert first_answer_s < 40, first_answer_s
            for batch_inputs in batches[1:]:  # the next upgrade is a rendezvous of our own
                assert_bit_exact(remote.generate_batch(*batch_inputs), expected(reference, mapping, batch_inputs))
            stats = remote.transport_stats()[0]
            assert stats["tier"] == "gloo", stats
        outcome = _read_until(stranger, ("NOTHING", "RECEIVED"), seen)
    finally:
        if stranger.poll() is None:
            stranger.kill()
        stranger.wait(timeout=30)
    assert outcome.startswith("NOTHING"), "".join(seen)
    assert not [line for line in seen if line.startswith("RECEIVED")], seen
    closed = status(server.url)["recently_closed"]
    rejected = [lk for lk in closed if lk["state"] == "rejected"]
    assert rejected and rejected[-1]["transfers"] == 0 and rejected[-1]["bytes"] == 0, (closed, seen)
    assert health(server.url) == 200


def test_a_port_scan_of_the_store_does_not_break_the_rendezvous(
    two_port_server: tuple[ServerProcess, int],
    reference: Target,
    mapping: VocabMapping,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server, _ = two_port_server
    real_connect = group_plane.connect_store
    scans: list[int] = []

    def scanned_first(host: str, port: int, timeout: float) -> Any:
        for _ in range(3):  # what a port scanner does: connect, then hang up
            with socket.create_connection((host, port), timeout=5):
                pass
        scans.append(port)
        time.sleep(0.2)
        return real_connect(host, port, timeout)

    monkeypatch.setattr(group_plane, "connect_store", scanned_first)
    batch_inputs = inputs(reference, 1, 32, seed=1300)
    with connect(server.url, mapping, data_plane="gloo", data_plane_connect_timeout=120) as remote:
        assert_bit_exact(remote.generate_batch(*batch_inputs), expected(reference, mapping, batch_inputs))
        stats = remote.transport_stats()[0]
        assert (stats["tier"], stats["fallbacks"], stats["bytes"]["wire"]) == ("gloo", 0, 0)
        assert scans == [stats["port"]]
    assert health(server.url) == 200


def test_two_ports_serve_more_live_groups_than_ports(
    two_port_server: tuple[ServerProcess, int], reference: Target, mapping: VocabMapping
) -> None:
    """A port is needed only while a rendezvous is in progress: four live groups share two ports."""
    server, first = two_port_server
    clients = 4
    errors: list[BaseException] = []
    ports: dict[int, int] = {}
    up = [threading.Event() for _ in range(clients)]
    all_up = threading.Event()
    plan = [inputs(reference, 1, 16 + i, seed=1400 + i) for i in range(clients)]
    want = [expected(reference, mapping, batch_inputs) for batch_inputs in plan]  # the reference is not thread-safe

    def client(i: int) -> None:
        try:
            with connect(server.url, mapping, data_plane="gloo", data_plane_backoff=0) as remote:
                assert_bit_exact(remote.generate_batch(*plan[i]), want[i])
                up[i].set()
                assert all_up.wait(timeout=120)
                assert_bit_exact(remote.generate_batch(*plan[i]), want[i])
                stats = remote.transport_stats()[0]
                assert (stats["tier"], stats["fallbacks"]) == ("gloo", 0), stats
                ports[i] = stats["port"]
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            errors.append(exc)
            up[i].set()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    try:
        for i, thread in enumerate(threads):  # one rendezvous at a time; every group stays up
            thread.start()
            assert up[i].wait(timeout=120)
        assert not errors, errors
        assert len([lk for lk in status(server.url)["links"] if lk["state"] == "ready"]) >= clients
    finally:
        all_up.set()
        for thread in threads:
            thread.join(timeout=120)
    assert not errors, errors
    assert set(ports.values()) <= {first, first + 1}
