"""Compatibility with UNMODIFIED upstream code, both ways, bit for bit.

- Upstream's client (``nemo_automodel...remote.client.RemoteEagle3TargetModel``) against our
  appliance, a real server process.
- Our client against upstream's server (``remote.server.TargetModelServer`` + ``serve``, run
  by ``upstream_server.py`` in its own process), which knows nothing of ``POST /session``;
  also two of them as a fleet, one killed and restarted (failover, probing ``/health``).

The reference is upstream's own in-process computation: its co-located backend
(``HFEagle3TargetModel``) and the projection its trainer applies to those logits.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import httpx
import pytest

from eagle3_appliance.launch import ServerProcess, free_port
from eagle3_client import RemoteEagle3TargetModel
from eagle3_client.synthetic import random_batch, vocab_mapping
from tests.integration.automodel_support import (
    PYTHON,
    colocated_supervision,
    env,
    import_or_skip,
    load_colocated,
    python_env,
)
from tests.oracle import assert_bit_exact

upstream_client = import_or_skip("nemo_automodel.components.speculative.eagle.remote.client")
upstream_target = import_or_skip("nemo_automodel.components.speculative.eagle.target")

VOCAB = 1024
# (batch, seq, pad): padded rows have attention_mask zeros at the end.
CASES = [(1, 1, False), (1, 9, False), (2, 24, True), (3, 40, True), (4, 17, True)]
UPSTREAM_SERVER = Path(__file__).with_name("upstream_server.py")


@pytest.fixture(scope="module")
def colocated(model_dir: Path) -> object:
    return load_colocated(model_dir)


@pytest.fixture(scope="module")
def appliance(appliances: list[ServerProcess]) -> ServerProcess:
    return appliances[0]


def test_upstream_client_against_our_appliance(appliance: ServerProcess, colocated: object) -> None:
    with env(NEMO_EAGLE_ENABLE_NCCL="0"):
        remote = upstream_client.RemoteEagle3TargetModel.from_urls([appliance.url], device="cpu", timeout=60)
    try:
        assert remote.model_info()["aux_layer_ids"] == colocated.aux_layer_ids
        assert_bit_exact(
            {"weight": remote.get_input_embeddings().weight},
            {"weight": colocated.get_input_embeddings().weight.detach()},
        )
        for seed, (batch, seq, pad) in enumerate(CASES):
            ids, mask = vocab_mapping(VOCAB, 97 + 61 * seed, seed=seed)  # unsorted, new each case
            assert not bool((ids[1:] >= ids[:-1]).all()), "the mapping should be unsorted"
            remote.set_vocab_mapping(ids, mask)
            inputs = random_batch(VOCAB, batch, seq, seed=100 + seed, pad=pad)
            if pad:
                assert bool((inputs[1] == 0).any()), "a padded case must have attention_mask zeros"
            got = remote.generate_batch(*inputs)
            assert type(got) is upstream_target.Eagle3TargetBatch
            assert_bit_exact(got, colocated_supervision(colocated, inputs, ids, mask))
    finally:
        remote.close()


def start_upstream(model_dir: Path, port: int, log: IO[bytes]) -> subprocess.Popen[bytes]:
    """Upstream's server on the built-in model, in its own process, NCCL off; returns once ``/health`` answers."""
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [PYTHON, str(UPSTREAM_SERVER), "--model", str(model_dir), "--port", str(port)],
        env=python_env(NEMO_EAGLE_ENABLE_NCCL="0"),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 180
    while True:
        assert proc.poll() is None, f"upstream server exited with {proc.returncode}; see {log.name}"
        try:
            if httpx.get(url + "/health", timeout=1.0, trust_env=False).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "upstream server did not answer /health"
        time.sleep(0.2)


def stop_upstream(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def upstream_server(model_dir: Path, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """Upstream's server on the built-in model, in its own process, NCCL off."""
    port = free_port()
    with open(tmp_path / "upstream_server.log", "wb") as log:
        proc = start_upstream(model_dir, port, log)
        try:
            yield proc, f"http://127.0.0.1:{port}"
        finally:
            stop_upstream(proc)


def test_our_client_against_the_upstream_server(
    upstream_server: tuple[subprocess.Popen[bytes], str], colocated: object
) -> None:
    proc, url = upstream_server
    remote = RemoteEagle3TargetModel.from_urls([url], device="cpu", timeout=60, max_retries=0)
    try:
        assert remote.model_info()["aux_layer_ids"] == colocated.aux_layer_ids
        # POST /session got upstream's 404; from then on the client speaks plain upstream protocol.
        assert all(server.upstream and server.session_id is None for server in remote._servers)
        assert_bit_exact(
            {"weight": remote.get_input_embeddings().weight},
            {"weight": colocated.get_input_embeddings().weight.detach()},
        )
        for seed, (batch, seq, pad) in enumerate(CASES):
            ids, mask = vocab_mapping(VOCAB, 101 + 53 * seed, seed=10 + seed)
            remote.set_vocab_mapping(ids, mask)
            inputs = random_batch(VOCAB, batch, seq, seed=200 + seed, pad=pad)
            got = remote.generate_batch(*inputs)
            assert type(got) is upstream_target.Eagle3TargetBatch
            assert_bit_exact(got, colocated_supervision(colocated, inputs, ids, mask))
    finally:
        remote.close()
    # Upstream's server stops itself on /disconnect: our close() must have sent it.
    assert proc.wait(timeout=30) == 0


def test_our_client_fails_over_between_upstream_servers_and_takes_one_back(
    model_dir: Path, tmp_path: Path, colocated: object
) -> None:
    """Two unmodified upstream servers: one is killed (SIGKILL) and restarted; every batch arrives, exact."""
    ports = [free_port(), free_port()]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    logs = [open(tmp_path / f"upstream-{i}.log", "wb") for i in range(3)]  # noqa: SIM115 - closed below
    procs = [start_upstream(model_dir, port, log) for port, log in zip(ports, logs, strict=False)]
    ids, mask = vocab_mapping(VOCAB, 150, seed=3)
    inputs = [random_batch(VOCAB, 2, 10 + i, seed=300 + i, pad=True) for i in range(12)]
    got = []
    remote = RemoteEagle3TargetModel.from_urls(
        urls, device="cpu", timeout=60, probe_interval=0.2, probe_max_interval=1.0, failover_timeout=120
    )
    try:
        remote.set_vocab_mapping(ids, mask)
        assert all(server.upstream for server in remote._servers)
        got += [h.result(60) for h in [remote.generate_batch_async(*b) for b in inputs[:4]]]
        procs[0].kill()  # SIGKILL: upstream's server has no other way to fail
        procs[0].wait(30)
        got += [h.result(60) for h in [remote.generate_batch_async(*b) for b in inputs[4:8]]]
        assert remote.transport_stats()[0]["state"] == "out"
        procs[0] = start_upstream(model_dir, ports[0], logs[2])  # the same port
        deadline = time.monotonic() + 30
        while remote.transport_stats()[0]["state"] != "ready":  # probed on /health
            assert time.monotonic() < deadline, remote.transport_stats()[0]
            time.sleep(0.1)
        served = remote.transport_stats()[0]["served"]
        got += [h.result(60) for h in [remote.generate_batch_async(*b) for b in inputs[8:]]]
        assert remote.transport_stats()[0]["served"] > served  # used again, with the mapping replayed
    finally:
        remote.close()
        for proc in procs:
            stop_upstream(proc)
        for log in logs:
            log.close()
    assert len(got) == len(inputs)
    for batch, batch_inputs in zip(got, inputs, strict=True):
        assert_bit_exact(batch, colocated_supervision(colocated, batch_inputs, ids, mask))
