"""Client leases on real servers: heartbeats keep a live client, a killed client's session expires,
one client's /disconnect leaves the others (and the server) alone, --exit-when-idle exits after the last."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest
import torch

from eagle3_appliance.core.inputs import VocabMapping
from eagle3_client import RemoteEagle3TargetModel, protocol
from eagle3_client.synthetic import random_batch, vocab_mapping
from tests.ops_support import REPO, metric, scrape, server, wait_until

LEASE = 1.5

_CLIENT = """
import sys, time, torch
from eagle3_client import RemoteEagle3TargetModel
remote = RemoteEagle3TargetModel.from_urls([sys.argv[1]])
ids = torch.arange(0, 1024, 8)
mask = torch.zeros(1024, dtype=torch.bool)
mask[ids] = True
remote.set_vocab_mapping(ids, mask)
print(remote._servers[0].session_id, flush=True)
time.sleep(120)
"""


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("sessions")
    with server(["--lease-seconds", str(LEASE)], {}, tmp / "server.log") as proc:
        yield proc.url


def _heartbeat(url: str, session_id: str) -> int:
    resp = httpx.post(url + "/heartbeat", content=b"{}", headers={protocol.SESSION_HEADER: session_id}, trust_env=False)
    return resp.status_code


def test_heartbeats_keep_a_live_client_and_a_killed_clients_session_expires(url: str) -> None:
    before = scrape(url)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    client = subprocess.Popen([sys.executable, "-c", _CLIENT, url], env=env, stdout=subprocess.PIPE, text=True)
    try:
        session_id = client.stdout.readline().strip()  # type: ignore[union-attr]
        assert len(session_id) == 16, session_id
        # The client beats every lease/3; once it has beaten 6 times (two whole leases), its
        # session has outlived the lease twice over and is still there.
        wait_until(
            lambda: (
                metric(scrape(url), "eagle3_request_success_total", endpoint="heartbeat")
                - metric(before, "eagle3_request_success_total", endpoint="heartbeat")
                >= 6
            ),
            timeout=60,
            what="six heartbeats",
        )
        alive = scrape(url)
        assert metric(alive, "eagle3_connected_clients") == 1
        assert metric(alive, "eagle3_session_ends_total", reason="expired") == metric(
            before, "eagle3_session_ends_total", reason="expired"
        )
    finally:
        client.send_signal(signal.SIGKILL)
        client.wait(30)
    wait_until(lambda: metric(scrape(url), "eagle3_connected_clients") == 0, timeout=60, what="the lease to run out")
    after = scrape(url)
    expired = metric(after, "eagle3_session_ends_total", reason="expired") - metric(
        before, "eagle3_session_ends_total", reason="expired"
    )
    assert expired == 1
    assert _heartbeat(url, session_id) == 410  # gone for good; a live client would re-register


def test_one_clients_disconnect_leaves_the_other_and_the_server_alone(url: str) -> None:
    before = scrape(url)
    mapping = VocabMapping(*vocab_mapping(1024, 100))
    inputs = random_batch(1024, 2, 12, seed=9)
    a = RemoteEagle3TargetModel.from_urls([url])
    b = RemoteEagle3TargetModel.from_urls([url])
    try:
        for remote in (a, b):
            remote.set_vocab_mapping(mapping.selected_token_ids, mapping.selected_token_mask)
        first = b.generate_batch(*inputs)
        assert metric(scrape(url), "eagle3_connected_clients") == 2
        a.close()
        assert metric(scrape(url), "eagle3_connected_clients") == 1
        second = b.generate_batch(*inputs)  # b's session and vocab mapping are untouched
        assert torch.equal(second.target_probs, first.target_probs)
        assert torch.equal(second.aux_hidden_states, first.aux_hidden_states)
    finally:
        a.close()
        b.close()
    after = scrape(url)
    disconnects = metric(after, "eagle3_session_ends_total", reason="disconnect") - metric(
        before, "eagle3_session_ends_total", reason="disconnect"
    )
    assert disconnects == 2
    # Without --exit-when-idle the server stays up after the last client left, and an upstream
    # client's /disconnect (no session) does not stop it either, unlike upstream's server.
    assert httpx.post(url + "/disconnect", json={}, trust_env=False).json() == {"status": "ok"}
    assert httpx.get(url + "/health/live", trust_env=False).status_code == 200
    assert metric(after, "eagle3_connected_clients") == 0


def test_exit_when_idle_exits_0_after_the_last_session_leaves(tmp_path_factory: pytest.TempPathFactory) -> None:
    tmp = tmp_path_factory.mktemp("idle")
    proc = server(["--exit-when-idle"], {}, tmp / "server.log")
    with proc:
        a = RemoteEagle3TargetModel.from_urls([proc.url])
        b = RemoteEagle3TargetModel.from_urls([proc.url])
        try:
            a.model_info()
            b.model_info()  # both registered
            a.close()
            info = b.model_info()  # the server is still there for b
            assert info["num_hidden_layers"] == 8
            assert proc.proc is not None and proc.proc.poll() is None
        finally:
            a.close()
            b.close()  # the last session leaves
        assert proc.proc is not None
        assert proc.proc.wait(timeout=60) == 0
    assert "--exit-when-idle is set: shutting down" in (tmp / "server.log").read_text()
