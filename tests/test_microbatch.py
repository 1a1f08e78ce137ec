"""Micro-batching: concurrent requests share one forward; answers stay close, a lone request is exact."""

from __future__ import annotations

import asyncio
import concurrent.futures
from pathlib import Path

import pytest
import torch

from appliance.buffers import ServerBuffers
from appliance.demo import make_batch, make_vocab_mapping, supervision_equal
from appliance.launch import ServerProcess
from appliance.microbatch import MicroBatcher
from appliance.server import ModelRunner
from appliance.settings import Settings
from appliance.target import Target, load_target
from client import RemoteEagle3TargetModel


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("microbatch-cache")


@pytest.fixture(scope="module")
def target(cache_dir: Path) -> Target:
    return load_target(Settings(cache_dir=cache_dir))


def _close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    for key, expected in want.items():
        actual = got[key]
        assert actual.dtype == expected.dtype and actual.shape == expected.shape, key
        if expected.is_floating_point():
            torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)
        elif key != "position_mask":  # a near-tie may flip an argmax; counted by the benchmark
            assert torch.equal(actual, expected), key


def _run_batcher(target: Target, calls: list[tuple], wait_s: float, max_tokens: int):
    runner = ModelRunner()
    buffers = ServerBuffers(target.device, 1 << 30)

    async def main():
        batcher = MicroBatcher(target, buffers, runner.run, wait_s=wait_s, max_tokens=max_tokens)
        results = await asyncio.gather(*(batcher.supervise(*inputs, mapping) for inputs, mapping in calls))
        return batcher, results

    try:
        return asyncio.run(main())
    finally:
        runner.shutdown()


def test_concurrent_requests_of_one_length_share_a_forward(target: Target):
    calls = [
        (make_batch(target.vocab_size, 2, 48, seed=s), make_vocab_mapping(target.logits_size, 100 + 50 * s, seed=s))
        for s in range(4)
    ]
    batcher, results = _run_batcher(target, calls, wait_s=0.5, max_tokens=10_000)
    assert (batcher.groups_run, batcher.requests_run) == (1, 4)
    for (inputs, mapping), result in zip(calls, results, strict=True):
        _close(result, target.supervise(*inputs, mapping))
        assert result["target_probs"].shape[-1] == mapping.draft_vocab_size  # each its own draft vocab


def test_groups_split_by_length_and_token_budget(target: Target):
    mapping = make_vocab_mapping(target.logits_size, 64)
    calls = [(make_batch(target.vocab_size, 1, 32, seed=s), mapping) for s in range(3)]
    calls.append((make_batch(target.vocab_size, 1, 40, seed=9), mapping))  # another length: its own group
    batcher, results = _run_batcher(target, calls, wait_s=0.5, max_tokens=64)  # two 32-token rows per group
    assert batcher.requests_run == 4 and batcher.groups_run == 3
    for (inputs, m), result in zip(calls, results, strict=True):
        _close(result, target.supervise(*inputs, m))


def test_a_lone_request_is_bit_exact(target: Target):
    inputs = make_batch(target.vocab_size, 2, 48, seed=5)
    mapping = make_vocab_mapping(target.logits_size, 77)
    batcher, (result,) = _run_batcher(target, [(inputs, mapping)], wait_s=0.01, max_tokens=10_000)
    want = target.supervise(*inputs, mapping)
    assert batcher.groups_run == 1
    for key in want:
        assert torch.equal(result[key], want[key]), key


def test_batching_server_answers_concurrent_clients(cache_dir: Path, target: Target):
    args = ["--cache-dir", str(cache_dir), "--log-level", "WARNING", "--microbatch-wait-ms", "300"]
    mappings = [make_vocab_mapping(target.logits_size, 128, seed=s) for s in range(3)]
    inputs = [make_batch(target.vocab_size, 2, 64, seed=s) for s in range(3)]
    with ServerProcess(args) as server:

        def client(i: int):
            with RemoteEagle3TargetModel.from_urls([server.url], device="cpu") as remote:
                remote.set_vocab_mapping(mappings[i].selected_token_ids, mappings[i].selected_token_mask)
                return remote.generate_batch(*inputs[i])

        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            batches = list(pool.map(client, range(3)))
        alone = client(0)
    for i, batch in enumerate(batches):
        _close(
            {
                k: getattr(batch, k)
                for k in ("aux_hidden_states", "target_probs", "position_mask", "input_ids", "loss_mask")
            },
            target.supervise(*inputs[i], mappings[i]),
        )
    assert supervision_equal(alone, target.supervise(*inputs[0], mappings[0]))
