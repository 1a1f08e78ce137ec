"""A fleet of real appliance processes: failover, re-admission, load-aware routing, one model per fleet, pipelining.

Every answer is compared, bit for bit, with the same model run in this process
(:func:`eagle3_appliance.model.supervision.in_process`).
"""

from __future__ import annotations

import concurrent.futures
import signal
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from eagle3_appliance.core.inputs import GenerateInputs, VocabMapping
from eagle3_appliance.launch import ServerProcess
from eagle3_appliance.model.builtin_model import ensure_builtin_model
from eagle3_appliance.model.loading import load_target
from eagle3_appliance.model.supervision import in_process, supervision_equal
from eagle3_appliance.model.target import Target
from eagle3_appliance.settings import Settings
from eagle3_client import ModelMismatch, NoServerReady, RemoteEagle3TargetModel, protocol
from eagle3_client.synthetic import random_batch, vocab_mapping
from tests.ops_support import FORWARD_DELAY_ENV, make_slow_model, metric, model_env, scrape, server, wait_until

VOCAB, DRAFT = 1024, 200
PROBE = {"probe_interval": 0.2, "probe_max_interval": 1.0}
Inputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def start_all(procs: Sequence[ServerProcess]) -> list[ServerProcess]:
    """Start server processes side by side (each waits for its own model)."""
    with concurrent.futures.ThreadPoolExecutor(len(procs)) as pool:
        return list(pool.map(lambda p: p.start(), procs))


@pytest.fixture(scope="module")
def reference(cache_dir: Path) -> Target:
    return load_target(Settings(cache_dir=cache_dir))


@pytest.fixture(scope="module")
def mapping() -> VocabMapping:
    return VocabMapping(*vocab_mapping(VOCAB, DRAFT, seed=3))


def batches(n: int, seed: int) -> list[Inputs]:
    # Lengths vary, so a batch paired with another's answer cannot pass.
    return [random_batch(VOCAB, 2, 8 + (i % 5) * 4, seed=seed + i) for i in range(n)]


def trainer_loop(remote: RemoteEagle3TargetModel, inputs: Sequence[Inputs], depth: int) -> Iterator[Any]:
    """What the recipe's prefetch does: up to ``depth`` requests in flight, results in order."""
    queue: deque[Any] = deque()
    pending = iter(inputs)
    for batch_inputs in pending:
        queue.append(remote.generate_batch_async(*batch_inputs))
        if len(queue) >= depth:
            break
    while queue:
        handle = queue.popleft()
        result = handle.result(timeout=120)
        nxt = next(pending, None)
        if nxt is not None:
            queue.append(remote.generate_batch_async(*nxt))
        yield result


def by_url(remote: RemoteEagle3TargetModel) -> dict[str, dict[str, Any]]:
    return {entry["url"]: entry for entry in remote.transport_stats()}


def test_a_killed_server_fails_over_exactly_and_is_used_again_after_its_restart(
    cache_dir: Path, tmp_path: Path, reference: Target, mapping: VocabMapping
) -> None:
    args = ["--cache-dir", str(cache_dir)]
    procs = start_all([ServerProcess(args, log_path=tmp_path / f"server-{i}.log") for i in range(3)])
    inputs = batches(40, seed=100)
    got: list[Any] = []
    try:
        options = {"timeout": 30, "failover_timeout": 60, **PROBE}
        with RemoteEagle3TargetModel.from_urls([p.url for p in procs], **options) as remote:
            remote.set_vocab_mapping(mapping.selected_token_ids, mapping.selected_token_mask)
            loop = trainer_loop(remote, inputs, depth=3 * remote.options.max_in_flight_per_server)
            got += [next(loop) for _ in range(10)]
            # The victim is a server holding a batch, so that the kill cuts a request off. (The
            # router sends work by measured speed: a server it found slower may get none for a while.)
            busy: list[int] = []
            while not busy and len(got) < 20:
                busy = [i for i, p in enumerate(procs) if by_url(remote)[p.url]["in_flight"]]
                if not busy:
                    got.append(next(loop))
            assert busy, remote.transport_stats()
            index = busy[0]
            victim = procs[index]
            assert by_url(remote)[victim.url]["served"] > 0
            assert victim.proc is not None
            victim.proc.send_signal(signal.SIGKILL)
            victim.proc.wait(30)
            # Its batch may have been answered just before the kill: then the next one it is sent fails.
            while by_url(remote)[victim.url]["state"] != "out" and len(got) < 30:
                got.append(next(loop))
            stats = by_url(remote)[victim.url]
            assert stats["state"] == "out" and stats["failovers"] >= 1, stats

            restarted = ServerProcess(args, port=victim.port, log_path=tmp_path / "victim-again.log").start()
            procs[index] = restarted
            # Back in the rotation within the documented probe interval (plus a busy machine's margin).
            wait_until(
                lambda: by_url(remote)[victim.url]["state"] == "ready",
                timeout=PROBE["probe_max_interval"] + 10,
                what="re-admission",
            )
            served_before = by_url(remote)[victim.url]["served"]
            got += list(loop)
            stats = by_url(remote)[victim.url]
            assert stats["readmissions"] == 1 and stats["served"] > served_before, stats
            total_failovers = sum(e["failovers"] for e in remote.transport_stats())
        # Every batch arrived once, in order, bit-exact.
        assert len(got) == len(inputs)
        for batch, batch_inputs in zip(got, inputs, strict=True):
            assert supervision_equal(batch, in_process(reference, GenerateInputs(*batch_inputs), mapping))
        # The servers counted it: the restarted one a re-admission, the others the re-sent requests.
        assert metric(scrape(restarted.url), "eagle3_fleet_readmissions_total") == 1
        resent = sum(
            metric(scrape(p.url), "eagle3_fleet_failover_requests_total") for i, p in enumerate(procs) if i != index
        )
        assert 1 <= resent <= total_failovers
    finally:
        for p in procs:
            p.stop()


def test_with_every_server_down_the_client_names_each_after_the_failover_timeout(
    cache_dir: Path, tmp_path: Path, mapping: VocabMapping
) -> None:
    procs = start_all(
        [ServerProcess(["--cache-dir", str(cache_dir)], log_path=tmp_path / f"s{i}.log") for i in range(2)]
    )
    try:
        with RemoteEagle3TargetModel.from_urls([p.url for p in procs], failover_timeout=2, **PROBE) as remote:
            remote.set_vocab_mapping(mapping.selected_token_ids, mapping.selected_token_mask)
            remote.generate_batch(*batches(1, seed=5)[0])
            for p in procs:
                assert p.proc is not None
                p.proc.send_signal(signal.SIGKILL)
                p.proc.wait(30)
            started = time.monotonic()
            with pytest.raises(NoServerReady) as info:
                remote.generate_batch(*batches(1, seed=6)[0])
            waited = time.monotonic() - started
    finally:
        for p in procs:
            p.stop()
    assert waited >= 2.0
    assert set(info.value.reasons) == {p.url for p in procs}
    for p in procs:
        assert f"{p.url}: out for" in str(info.value)
    assert "failover_timeout" in str(info.value)


def test_servers_that_load_different_weights_are_refused_naming_both(cache_dir: Path, tmp_path: Path) -> None:
    other = ensure_builtin_model(tmp_path / "other", seed=999)  # the same architecture, other weights
    procs = start_all(
        [
            ServerProcess(["--cache-dir", str(cache_dir)], log_path=tmp_path / "a.log"),
            ServerProcess(["--model", str(other)], log_path=tmp_path / "b.log"),
        ]
    )
    try:
        with RemoteEagle3TargetModel.from_urls([p.url for p in procs]) as remote, pytest.raises(ModelMismatch) as info:
            remote.set_vocab_mapping(*vocab_mapping(VOCAB, DRAFT, seed=1))
        assert procs[0].url in str(info.value) and procs[1].url in str(info.value)
        assert len(set(info.value.fingerprints.values())) == 2
    finally:
        for p in procs:
            p.stop()


def test_servers_of_one_model_report_one_fingerprint(cache_dir: Path, tmp_path: Path) -> None:
    procs = start_all(
        [ServerProcess(["--cache-dir", str(cache_dir)], log_path=tmp_path / f"s{i}.log") for i in range(2)]
    )
    try:
        with RemoteEagle3TargetModel.from_urls([p.url for p in procs]) as remote:
            served = remote.served_model()
            assert served is not None and served.fingerprint is not None and served.fingerprint.startswith("sha256:")
            assert {s.fingerprint for s in remote._servers} == {served.fingerprint}
            assert "eagle3" not in remote.model_info()  # upstream's keys only
    finally:
        for p in procs:
            p.stop()


@pytest.mark.serial  # the routing follows measured speed: other workers' load would skew it
def test_a_slowed_server_gets_fewer_batches_and_never_holds_up_the_fast_ones(
    tmp_path: Path, mapping: VocabMapping
) -> None:
    folder = make_slow_model(tmp_path / "model", 5.0)  # the same weights on every server
    args = ["--model", str(folder), "--trust-remote-code"]
    env = model_env()
    fast = [server(args, env, tmp_path / f"fast-{i}.log") for i in range(2)]
    slow = server(args, {**env, FORWARD_DELAY_ENV: "4.0"}, tmp_path / "slow.log")  # the test switch
    procs = start_all([fast[0], slow, fast[1]])
    inputs = batches(24, seed=300)
    samples: list[dict[str, dict[str, Any]]] = []
    try:
        with RemoteEagle3TargetModel.from_urls([p.url for p in procs], data_plane="wire") as remote:
            remote.set_vocab_mapping(mapping.selected_token_ids, mapping.selected_token_mask)
            stop = threading.Event()

            def sample() -> None:
                while not stop.wait(0.05):
                    samples.append(by_url(remote))

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            got = list(trainer_loop(remote, inputs, depth=6))
            stop.set()
            sampler.join(10)
            final = by_url(remote)
    finally:
        for p in procs:
            p.stop()
    assert len(got) == len(inputs)
    slow_served = final[slow.url]["served"]
    fast_served = [final[p.url]["served"] for p in fast]
    assert slow_served + sum(fast_served) == len(inputs)
    assert all(slow_served * 2 <= n for n in fast_served), (slow_served, fast_served)  # clearly fewer
    # While a request sat on the slow server, the fast ones kept answering: across the whole
    # time it was busy, they served more batches than it did by far.
    busy = [s for s in samples if s[slow.url]["in_flight"] > 0]
    assert busy, "the slow server never got a batch"
    during = sum(busy[-1][p.url]["served"] - busy[0][p.url]["served"] for p in fast)
    assert during >= 3, during


@pytest.mark.parametrize("data_plane", ["gloo", "wire"])
def test_two_requests_in_flight_per_server_stay_in_order_and_exact(
    server_for_pipelining: ServerProcess, reference: Target, mapping: VocabMapping, data_plane: str
) -> None:
    inputs = batches(12, seed=500)
    with RemoteEagle3TargetModel.from_urls(
        [server_for_pipelining.url], data_plane=data_plane, data_plane_backoff=0, max_in_flight_per_server=2
    ) as remote:
        remote.set_vocab_mapping(mapping.selected_token_ids, mapping.selected_token_mask)
        handles = [remote.generate_batch_async(*b) for b in inputs]  # all at once: the client holds 2 in flight
        got = [h.result(timeout=120) for h in handles]
        stats = remote.transport_stats()[0]
    for batch, batch_inputs in zip(got, inputs, strict=True):
        assert supervision_equal(batch, in_process(reference, GenerateInputs(*batch_inputs), mapping))
    assert stats["peak_in_flight"] == 2 and stats["served"] == len(inputs)
    assert stats["tier"] == data_plane and stats["fallbacks"] == 0, stats
    assert stats["bytes"][data_plane] > 0


@pytest.fixture(scope="module")
def server_for_pipelining(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("pipelining") / "server.log"
    with ServerProcess(["--cache-dir", str(cache_dir)], log_path=log) as proc:
        yield proc


def test_session_replies_and_model_info_carry_the_fingerprint(server_for_pipelining: ServerProcess) -> None:
    import httpx

    with httpx.Client(base_url=server_for_pipelining.url, trust_env=False, timeout=30) as http:
        reply = protocol.SessionReply.from_json(http.post("/session", json={}).json())
        info = http.post("/model_info", headers={protocol.SESSION_HEADER: reply.session_id}).json()
        plain = http.post("/model_info").json()
    assert reply.model_fingerprint is not None
    assert protocol.ModelInfoExtension.from_json(info["eagle3"]).fingerprint == reply.model_fingerprint
    assert "eagle3" not in plain  # an upstream client sees upstream's keys only
