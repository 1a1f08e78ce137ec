"""Broken transfers between real processes: each is recovered over the wire, bit-exact, and the
server keeps serving. Faults are real: a dropped group, a timeout, a client killed or frozen
in the middle of a transfer."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import torch

from eagle3_appliance.core.inputs import VocabMapping
from eagle3_appliance.launch import ServerProcess
from eagle3_appliance.model.target import Target
from eagle3_client import protocol, wire
from tests.ops_support import metric, scrape

from .helpers import assert_bit_exact, connect, expected, health, inputs, session_id, status, wait_for

ROOT = Path(__file__).resolve().parents[2]
STALL_CLIENT = Path(__file__).with_name("stall_client.py")
CLOSE_BEFORE_SEND = Path(__file__).with_name("close_before_send.py")
BIG_SEQ_LEN = 2048  # about 20 MB per answer: more than loopback socket buffers hold


def _fallbacks(url: str) -> dict[str, float]:
    """eagle3_dataplane_fallbacks_total by its ``requested`` label."""
    return {
        dict(labels)["requested"]: value
        for (name, labels), value in scrape(url).items()
        if name == "eagle3_dataplane_fallbacks_total"
    }


def test_a_group_the_server_drops_is_noticed_recovered_and_brought_back(
    dp_server: ServerProcess, reference: Target, mapping: VocabMapping
) -> None:
    batches = [inputs(reference, 2, 48, seed=200 + i) for i in range(4)]
    with connect(dp_server.url, mapping, data_plane="gloo", data_plane_backoff=0) as remote:
        assert_bit_exact(remote.generate_batch(*batches[0]), expected(reference, mapping, batches[0]))
        # The server drops its end (the same request the client sends when it gives up a group).
        sid = session_id(remote)
        dropped = httpx.post(
            dp_server.url + "/data_plane", json={"tier": "wire"}, headers={protocol.SESSION_HEADER: sid}, timeout=30
        )
        assert dropped.json() == {"tier": "wire"}
        assert status(dp_server.url, sid)["session"]["state"] == "none"
        # The next answer comes over the wire (no echo), correct; the client counts a fallback...
        before = _fallbacks(dp_server.url)
        assert_bit_exact(remote.generate_batch(*batches[1]), expected(reference, mapping, batches[1]))
        stats = remote.transport_stats()[0]
        assert (stats["fallbacks"], stats["reupgrades"], stats["tier"]) == (1, 0, "wire")
        # ...and so does the server, for its dashboard (the session had no group left).
        assert _fallbacks(dp_server.url) == {**before, "group": before.get("group", 0.0) + 1}
        assert stats["bytes"]["wire"] > 0
        # ...and, its back-off (0 s here) over, goes back to a new group.
        for batch_inputs in batches[2:]:
            assert_bit_exact(remote.generate_batch(*batch_inputs), expected(reference, mapping, batch_inputs))
        stats = remote.transport_stats()[0]
        assert (stats["fallbacks"], stats["reupgrades"], stats["tier"]) == (1, 1, "gloo")
        assert status(dp_server.url, sid)["session"]["state"] == "ready"
    assert health(dp_server.url) == 200


def test_a_transfer_timeout_is_answered_from_the_stored_result(
    dp_server: ServerProcess, reference: Target, mapping: VocabMapping
) -> None:
    # A transfer deadline no transfer can meet: every group transfer times out on the client.
    options = dict(data_plane="gloo", data_plane_timeout=1e-9, data_plane_connect_timeout=30, data_plane_backoff=0)
    batches = [inputs(reference, 2, 32, seed=300 + i) for i in range(3)]
    with connect(dp_server.url, mapping, **options) as remote:
        for batch_inputs in batches:
            assert_bit_exact(remote.generate_batch(*batch_inputs), expected(reference, mapping, batch_inputs))
        stats = remote.transport_stats()[0]
        # Each batch: group up, transfer times out, stored answer over the wire; then re-upgrade.
        assert (stats["fallbacks"], stats["reupgrades"]) == (3, 2)
        assert stats["bytes"]["gloo"] == 0 and stats["bytes"]["wire"] > 0
    assert health(dp_server.url) == 200


def _stall_client(url: str, mode: str, out: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, str(STALL_CLIENT), url, mode, str(BIG_SEQ_LEN), str(out)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _read_until(proc: subprocess.Popen[str], marker: str) -> str:
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith(marker):
            return line
    raise AssertionError(f"client ended (code {proc.wait()}) before {marker!r}:\n{''.join(lines)[-3000:]}")


def _field(line: str, name: str) -> str:
    return dict(part.split("=", 1) for part in line.split()[1:])[name]


def _link_on(url: str, port: int) -> dict | None:
    """The newest group on ``port``, live or recently closed."""
    body = status(url)
    return next((lk for lk in reversed(body["recently_closed"] + body["links"]) if lk["port"] == port), None)


def test_a_client_killed_mid_transfer_does_not_hang_the_server(
    fault_server: ServerProcess, reference: Target, mapping: VocabMapping, tmp_path: Path
) -> None:
    proc = _stall_client(fault_server.url, "die", tmp_path / "unused.pt")
    try:
        line = _read_until(proc, "STOPPING")
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    port, seq = int(_field(line, "port")), int(_field(line, "seq"))
    magic, got_seq, n_tensors, nbytes = map(int, _field(line, "header").split(","))
    assert (magic, got_seq, n_tensors) == (protocol.TRANSFER_MAGIC, seq, len(protocol.SUPERVISION_KEYS))
    assert nbytes > 16_000_000  # the tensors that were still to come when it died
    # The server's send fails (peer gone) and it drops that group; it never stops answering.
    assert health(fault_server.url) == 200
    link = wait_for(
        lambda: (lk := _link_on(fault_server.url, port)) and lk["state"] in ("failed", "peer gone") and lk, "teardown"
    )
    if link["state"] == "failed":  # the send noticed first (gloo words it as a closed or reset connection)
        assert link["failures"] == 1 and link["last_error"].startswith(f"transfer {seq}: gloo send"), link
    else:  # the client's HTTP connection closing was noticed first
        assert link["last_error"] == f"transfer {seq}: the client's HTTP connection closed during the send", link
    # A new client is served over a new group, correctly.
    batch_inputs = inputs(reference, 2, 40, seed=400)
    with connect(fault_server.url, mapping, data_plane="gloo") as remote:
        assert_bit_exact(remote.generate_batch(*batch_inputs), expected(reference, mapping, batch_inputs))
        stats = remote.transport_stats()[0]
        assert stats["tier"] == "gloo" and 29650 <= stats["port"] <= 29679  # from --data-plane-ports
    assert status(fault_server.url)["ports"] == "29650-29679"
    assert health(fault_server.url) == 200


def test_a_frozen_client_times_out_on_the_server_and_recovers_when_it_wakes(
    fault_server: ServerProcess, reference: Target, mapping: VocabMapping, tmp_path: Path
) -> None:
    out = tmp_path / "result.pt"
    proc = _stall_client(fault_server.url, "freeze", out)
    try:
        line = _read_until(proc, "STOPPING")
        port = int(_field(line, "port"))
        wait_for(lambda: os.waitpid(proc.pid, os.WUNTRACED | os.WNOHANG)[0] == proc.pid, "the client to stop")
        # The server's send to the frozen client hits --data-plane-timeout (3 s) and the group
        # is dropped, while the server goes on answering everyone else.
        link = wait_for(lambda: (lk := _link_on(fault_server.url, port)) and lk["state"] == "failed" and lk, "timeout")
        assert "Timed out" in link["last_error"], link
        assert health(fault_server.url) == 200
        batch_inputs = inputs(reference, 1, 24, seed=500)
        with connect(fault_server.url, mapping, data_plane="gloo") as other:
            assert_bit_exact(other.generate_batch(*batch_inputs), expected(reference, mapping, batch_inputs))
        # The client wakes up: its receive fails, and it gets the stored answer over the wire.
        os.kill(proc.pid, signal.SIGCONT)
        recovered = _read_until(proc, "RECOVERED")
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert int(_field(recovered, "fallbacks")) == 1 and int(_field(recovered, "wire_bytes")) > 0
    from .stall_client import DRAFT, VOCAB  # the child's inputs, rebuilt here

    assert (reference.vocab_size, mapping.draft_vocab_size) == (VOCAB, DRAFT)
    from eagle3_client.synthetic import random_batch

    want = expected(reference, mapping, random_batch(VOCAB, 2, BIG_SEQ_LEN, 1))
    got = torch.load(out)
    for key, value in want.items():
        assert torch.equal(got[key], value), key
    assert health(fault_server.url) == 200


def test_a_link_closing_between_the_metadata_and_the_send_is_answered_once_without_a_500(
    dp_cache: Path, reference: Target, mapping: VocabMapping, tmp_path: Path
) -> None:
    """The window between ``wait_ready()`` and ``link.send()``: the metadata has gone out, the link closes."""
    log = tmp_path / "server.log"
    launcher = (sys.executable, str(CLOSE_BEFORE_SEND))
    env = {"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    batches = [inputs(reference, 2, 32, seed=1500 + i) for i in range(2)]
    args = ["--cache-dir", str(dp_cache), "--data-plane-timeout", "20"]
    with ServerProcess(args, env=env, log_path=log, launcher=launcher) as server:
        options = dict(data_plane="gloo", data_plane_backoff=0)
        with connect(server.url, mapping, **options) as remote:
            for batch_inputs in batches:
                assert_bit_exact(remote.generate_batch(*batch_inputs), expected(reference, mapping, batch_inputs))
            stats = remote.transport_stats()[0]
            # Each answer: metadata, then the link closed under it; recovered from the stored result.
            assert (stats["fallbacks"], stats["bytes"]["gloo"]) == (2, 0), stats
            assert stats["bytes"]["wire"] > 0
        samples = scrape(server.url)
        assert metric(samples, "eagle3_request_failure_total", endpoint="generate", status="500") == 0
        assert metric(samples, "eagle3_request_success_total", endpoint="generate") == 2
        assert metric(samples, "eagle3_request_success_total", endpoint="data_plane/resend") == 2
        assert health(server.url) == 200
    text = log.read_text()
    assert "Traceback" not in text and " 500" not in text and "POST /generate failed" not in text, text[-3000:]


def test_a_client_whose_connection_closes_under_a_transfer_loses_its_group_at_once(
    dp_cache: Path, reference: Target, mapping: VocabMapping, tmp_path: Path
) -> None:
    """Not after --data-plane-timeout (60 s here): NCCL would otherwise hang on a dead peer that long."""
    args = ["--cache-dir", str(dp_cache), "--data-plane-timeout", "60"]
    with ServerProcess(args, log_path=tmp_path / "server.log") as server:
        remote = connect(server.url, mapping, data_plane="gloo")
        try:
            remote.generate_batch(*inputs(reference, 1, 8, seed=1800))  # the group is up
            plane = remote._servers[0].data_plane
            sid = session_id(remote)
            payload = wire.encode(
                dict(zip(protocol.GENERATE_INPUT_KEYS, inputs(reference, 2, BIG_SEQ_LEN, 1), strict=True))
            )
            seq, kind, _ = plane.request_transfer(payload)  # metadata in; the 20 MB send now waits for us
            assert kind == "gloo"
            remote._servers[0].control._http.close()  # the trainer's connections go away; its group does not
            link = wait_for(
                lambda: (lk := status(server.url, sid)["session"])["state"] == "peer gone" and lk,
                "the server to drop the group",
                limit=20,
            )
            assert "HTTP connection closed" in link["last_error"], link
            assert health(server.url) == 200
        finally:
            plane.group and plane.group.close()
            remote.close()
    assert "the client's connection closed while transfer" in (tmp_path / "server.log").read_text()
