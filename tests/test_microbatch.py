"""Micro-batching: concurrent requests share one forward; answers stay close, a lone request is exact."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

from eagle3_appliance.core.admission import Admission
from eagle3_appliance.core.inputs import GenerateInputs, VocabMapping
from eagle3_appliance.dataplanes.buffers import ServerBuffers
from eagle3_appliance.dataplanes.transfer import WireTransfer
from eagle3_appliance.launch import ServerProcess
from eagle3_appliance.model.loading import load_target
from eagle3_appliance.model.supervision import in_process, supervision_equal
from eagle3_appliance.model.target import Target
from eagle3_appliance.ops.gpu import GpuMonitor
from eagle3_appliance.ops.metrics import Metrics
from eagle3_appliance.serving.jobs import Job
from eagle3_appliance.serving.pipeline import Pipeline
from eagle3_appliance.settings import Settings
from eagle3_client import RemoteEagle3TargetModel, wire
from eagle3_client.capture import EAGLE3, Capture
from eagle3_client.encodings import PROBS
from eagle3_client.synthetic import random_batch, vocab_mapping
from tests.ops_support import batch, make_slow_model, metric, model_env, post, scrape, server, vocab_mapping_body


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


def _metrics() -> Metrics:
    zero = lambda: 0  # noqa: E731
    return Metrics(
        monitor=GpuMonitor(), inflight=zero, queued=zero, computing=zero, clients=zero, ready=lambda: True,
        draining=lambda: False,
    )  # fmt: skip


def _run_batcher(target: Target, calls: list[tuple], wait_s: float, max_tokens: int):
    """Run ``calls`` concurrently through the server's own pipeline with micro-batching on."""
    settings = Settings(microbatch_wait_ms=wait_s * 1000, microbatch_max_tokens=max_tokens)
    buffers = ServerBuffers(target.device, 1 << 30)
    admission = Admission(max_queue=64)
    pipeline = Pipeline(settings, target, buffers, admission, _metrics())

    async def one(inputs, mapping):
        async with admission.admit() as ticket:
            job = Job(GenerateInputs(*inputs), mapping, PROBS, WireTransfer(buffers), ticket)
            return await pipeline.compute(job)

    async def main():
        return await asyncio.gather(*(one(inputs, mapping) for inputs, mapping in calls))

    try:
        results = asyncio.run(main())
    finally:
        pipeline.runner.shutdown()
    assert pipeline.batcher is not None
    return pipeline, results


def test_concurrent_requests_of_one_length_share_a_forward(target: Target):
    calls = [
        (
            random_batch(target.vocab_size, 2, 48, seed=s),
            VocabMapping(*vocab_mapping(target.logits_size, 100 + 50 * s, seed=s)),
        )
        for s in range(4)
    ]
    pipeline, results = _run_batcher(target, calls, wait_s=0.5, max_tokens=10_000)
    assert (pipeline.batcher.groups_run, pipeline.batcher.jobs_run) == (1, 4)
    assert pipeline.metrics.exec_count._value.get() == 1  # one forward for the four requests
    for (inputs, mapping), result in zip(calls, results, strict=True):
        _close(result, in_process(target, GenerateInputs(*inputs), mapping))
        assert result["target_probs"].shape[-1] == mapping.draft_vocab_size  # each its own draft vocab


def test_groups_split_by_length_and_token_budget(target: Target):
    mapping = VocabMapping(*vocab_mapping(target.logits_size, 64))
    calls = [(random_batch(target.vocab_size, 1, 32, seed=s), mapping) for s in range(3)]
    calls.append((random_batch(target.vocab_size, 1, 40, seed=9), mapping))  # another length: its own group
    pipeline, results = _run_batcher(target, calls, wait_s=0.5, max_tokens=64)  # two 32-token rows per group
    assert pipeline.batcher.jobs_run == 4 and pipeline.batcher.groups_run == 3
    for (inputs, m), result in zip(calls, results, strict=True):
        _close(result, in_process(target, GenerateInputs(*inputs), m))


def test_a_lone_request_is_bit_exact(target: Target):
    inputs = random_batch(target.vocab_size, 2, 48, seed=5)
    mapping = VocabMapping(*vocab_mapping(target.logits_size, 77))
    pipeline, (result,) = _run_batcher(target, [(inputs, mapping)], wait_s=0.01, max_tokens=10_000)
    want = in_process(target, GenerateInputs(*inputs), mapping)
    assert pipeline.batcher.groups_run == 1
    for key in want:
        assert torch.equal(result[key], want[key]), key


def test_batching_server_answers_concurrent_clients(cache_dir: Path, target: Target):
    args = ["--cache-dir", str(cache_dir), "--log-level", "WARNING", "--microbatch-wait-ms", "300"]
    mappings = [VocabMapping(*vocab_mapping(target.logits_size, 128, seed=s)) for s in range(3)]
    inputs = [random_batch(target.vocab_size, 2, 64, seed=s) for s in range(3)]
    with ServerProcess(args) as server:

        def client(i: int):
            with RemoteEagle3TargetModel.from_urls([server.url], device="cpu") as remote:
                remote.set_vocab_mapping(mappings[i].selected_token_ids, mappings[i].selected_token_mask)
                return remote.generate_batch(*inputs[i])

        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            batches = list(pool.map(client, range(3)))
        alone = client(0)
    for i, answer in enumerate(batches):
        _close(
            {
                k: getattr(answer, k)
                for k in ("aux_hidden_states", "target_probs", "position_mask", "input_ids", "loss_mask")
            },
            in_process(target, GenerateInputs(*inputs[i]), mappings[i]),
        )
    assert supervision_equal(alone, in_process(target, GenerateInputs(*inputs[0]), mappings[0]))


@pytest.mark.serial  # a 1.5 s request time limit: other workers' load would spend it
def test_micro_batched_requests_share_the_admission_time_limit_and_metrics(tmp_path: Path) -> None:
    """Micro-batched /generate is counted, timed and time-limited like any other; forwards count once."""
    model = make_slow_model(tmp_path / "slow-model", 3.0)
    args = ["--model", str(model), "--trust-remote-code", "--request-timeout", "1.5", "--microbatch-wait-ms", "400"]
    with server(args, model_env(), tmp_path / "server.log") as proc:
        assert post(proc.url, "set_vocab_mapping", vocab_mapping_body(draft=200)).status_code == 200
        before = scrape(proc.url)
        barrier = threading.Barrier(3)

        def fast(i: int) -> httpx.Response:
            body = wire.encode(batch(2, 16, seed=i))
            barrier.wait(timeout=30)
            return post(proc.url, "generate", body)

        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            answers = list(pool.map(fast, range(3)))
        assert [r.status_code for r in answers] == [200, 200, 200]
        after = scrape(proc.url)
        started = time.monotonic()
        slow = post(proc.url, "generate", wire.encode(batch(1, 16, slow=True)))
        waited = time.monotonic() - started

    def delta(name: str) -> float:
        return metric(after, name) - metric(before, name)

    forwards = delta("eagle3_inference_exec_count_total")
    assert 1 <= forwards < 3, forwards  # the three requests shared forwards, and each forward counts once
    assert delta("eagle3_inference_count_total") == 3 * 2
    for phase in ("queue", "forward", "encode", "send"):
        assert delta(f"eagle3_inference_{phase}_duration_seconds_count") == 3, phase
    assert slow.status_code == 503, slow.text  # --request-timeout holds for micro-batched work too
    assert "request time limit of 1.5 s" in slow.json()["error"]
    assert waited < 2.8, waited  # answered at the limit, not after the 3 s forward


def test_eagle3_and_dflash_jobs_share_one_forward_each_with_its_own_answer(target: Target) -> None:
    settings = Settings(microbatch_wait_ms=500, microbatch_max_tokens=10_000)
    buffers = ServerBuffers(target.device, 1 << 30)
    admission = Admission(max_queue=64)
    pipeline = Pipeline(settings, target, buffers, admission, _metrics())
    mapping = VocabMapping(*vocab_mapping(target.logits_size, 200, seed=1))
    captures = [EAGLE3, Capture.dflash([6, 2]), Capture.dflash([0, 5, 7], logits=True)]
    inputs = [random_batch(target.vocab_size, 2, 32, seed=40 + i) for i in range(3)]

    async def one(capture: Capture, batch: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
        async with admission.admit() as ticket:
            job_mapping = mapping if capture.is_eagle3 else None
            job = Job(GenerateInputs(*batch), job_mapping, PROBS, WireTransfer(buffers), ticket, capture=capture)
            return await pipeline.compute(job)

    async def main() -> list[dict[str, torch.Tensor]]:
        return await asyncio.gather(*(one(c, b) for c, b in zip(captures, inputs, strict=True)))

    try:
        results = asyncio.run(main())
    finally:
        pipeline.runner.shutdown()
    assert pipeline.metrics.exec_count._value.get() == 1  # one forward for the three requests
    _close(results[0], in_process(target, GenerateInputs(*inputs[0]), mapping))
    for capture, rows, result in zip(captures[1:], inputs[1:], results[1:], strict=True):
        layer, logits = _layer_outputs(target.model, rows)
        want = {"hidden_states": torch.cat([layer[i] for i in capture.layers], dim=-1)}
        if capture.logits:
            want["logits"] = logits
        assert list(result) == list(capture.keys)
        _close(result, want)


def _layer_outputs(
    model: torch.nn.Module, batch: tuple[torch.Tensor, ...]
) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """Every decoder layer's output (hooked here, independently of the server's code) and the logits."""
    outputs: dict[int, torch.Tensor] = {}
    handles = [
        layer.register_forward_hook(lambda _m, _i, o, i=i: outputs.__setitem__(i, o[0] if isinstance(o, tuple) else o))
        for i, layer in enumerate(model.model.layers)
    ]
    try:
        with torch.no_grad():
            logits = model(input_ids=batch[0], attention_mask=batch[1]).logits
    finally:
        for handle in handles:
            handle.remove()
    return outputs, logits
