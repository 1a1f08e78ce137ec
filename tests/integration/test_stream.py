"""The stream: a fleet runs ahead of the trainers, on NeMo AutoModel's streaming API (issue #30).

References come from upstream: its ``FeatureDataLoader`` and ``SampleRef`` unchanged, and its
co-located ``HFEagle3TargetModel`` / ``HFDFlashTargetModel`` / ``HFDSparkTargetModel`` computing the expected answers in
this process. Both queue backends run: ``appliance://`` (hosted by an appliance) and
``redis://`` (a real ``redis-server``). The guarantees are tested by killing things: a trainer
holding a lease, an appliance with unclaimed answers, the producer mid-run.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from eagle3_appliance.launch import ServerProcess
from eagle3_appliance.produce import batches_of
from eagle3_client import protocol
from eagle3_client.capture import Capture
from eagle3_client.streaming.producer import Producer, sample_id
from eagle3_client.streaming.queues import RunMismatch, StreamError, UnknownRun, UnknownSample
from eagle3_client.synthetic import vocab_mapping
from tests.integration.automodel_support import colocated_supervision, import_or_skip
from tests.integration.test_packing_compat import documents

streaming = import_or_skip("nemo_automodel.components.speculative.streaming")
upstream_eagle = import_or_skip("nemo_automodel.components.speculative.eagle.target")
upstream_dflash = import_or_skip("nemo_automodel.components.speculative.dflash.target")
upstream_dspark = import_or_skip("nemo_automodel.components.speculative.dspark.target")
open_stream = import_or_skip("eagle3_client.streaming.open").open_stream  # the consumer side needs AutoModel

VOCAB, DRAFT = 1024, 256
PYTHON = sys.executable
REPO = Path(__file__).resolve().parents[2]


# -- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_model(model_dir: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).requires_grad_(False)


@pytest.fixture(scope="module")
def colocated(hf_model: torch.nn.Module) -> Any:
    return upstream_eagle.HFEagle3TargetModel(hf_model)


@pytest.fixture(scope="module")
def pair(appliances: list[ServerProcess]) -> list[ServerProcess]:
    """The two session-wide appliances (the kill tests start their own)."""
    return appliances


@pytest.fixture(params=["appliance", "redis"])
def queue_url(request: pytest.FixtureRequest, pair: list[ServerProcess]) -> str:
    if request.param == "redis":
        return str(request.getfixturevalue("redis_url"))
    return "appliance://" + pair[0].url.removeprefix("http://")


_runs = iter(range(10**6))


def new_run(tag: str) -> str:
    return f"{tag}-{time.time_ns() % 10**9}-{next(_runs)}"


MAPPING = vocab_mapping(VOCAB, DRAFT, seed=11)


def rows(count: int, seed: int, max_len: int = 40) -> list[dict[str, list[int]]]:
    out = documents(count, max_len, seed)
    return [{**r, "attention_mask": [1] * len(r["input_ids"])} for r in out]


def produce_in_thread(producer: Producer) -> tuple[threading.Thread, dict[str, Any]]:
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["report"] = producer.run(timeout=180)
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            result["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


def record_leases(queue: Any) -> list[str]:
    """The sample ids ``queue.acquire`` hands out, in order (the loader does not say which it yields)."""
    seen: list[str] = []
    original = queue.acquire

    def acquire(**kwargs: Any) -> Any:
        lease = original(**kwargs)
        if lease is not None:
            seen.append(lease.ref.sample_id)
        return lease

    queue.acquire = acquire
    return seen


def assert_equal(got: torch.Tensor | None, want: torch.Tensor | None, what: str) -> None:
    assert got is not None and want is not None, what
    assert got.dtype == want.dtype and got.shape == want.shape, (what, got.dtype, want.dtype, got.shape, want.shape)
    assert torch.equal(got, want), what


# -- bit for bit, in process ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("packed", "data_plane", "read_ahead"),
    [(False, "wire", 0), (False, "gloo", 0), (True, "wire", 0), (False, "wire", 3)],
)
def test_upstream_loader_yields_the_colocated_batches(
    pair: list[ServerProcess], queue_url: str, colocated: Any, packed: bool, data_plane: str, read_ahead: int
) -> None:
    batches = batches_of(rows(10, seed=3), 2, packed_sequence_size=64 if packed else 0)
    run_id = new_run("exact")
    urls = [p.url for p in pair]
    with Producer(urls, queue_url, run_id, batches, vocab_mapping=MAPPING, visibility_timeout=30) as producer:
        thread, result = produce_in_thread(producer)
        queue, store = open_stream(
            queue_url, run_id=run_id, wait_for_run=30, data_plane=data_plane, read_ahead=read_ahead
        )
        seen = record_leases(queue)
        got = list(streaming.FeatureDataLoader(queue, store))
        thread.join(60)
        store.close()
    assert "error" not in result, result
    assert sorted(seen) == [sample_id(0, i) for i in range(len(batches))]
    for sid, batch in zip(seen, got, strict=True):
        source = batches[int(sid.rsplit("-b", 1)[1])]
        packing = {k: source[k] for k in protocol.PACKING_KEYS if k in source}
        inputs = (source["input_ids"], source["attention_mask"], source["loss_mask"])
        want = colocated_supervision(colocated, inputs, *MAPPING, **packing)
        assert type(batch) is upstream_eagle.Eagle3TargetBatch
        for key, value in want.items():
            assert_equal(getattr(batch, key), value, key)
        assert_equal(batch.attention_mask, source["attention_mask"], "attention_mask")
        for key in protocol.PACKING_KEYS:
            assert_equal(getattr(batch, key), packing.get(key), key) if packed else None
    state = queue.backend.state()
    assert state.closed and state.acked == len(batches) and state.redelivered == 0
    for proc in pair:  # the run ended: nothing of it is kept
        assert run_id not in httpx.get(proc.url + "/stream/runs").json()["runs"]


def test_a_dflash_capture_streams_through_our_loader(
    pair: list[ServerProcess], queue_url: str, hf_model: torch.nn.Module
) -> None:
    from eagle3_client.streaming.loader import DFlashFeatureLoader

    layers = [1, 3, 6]
    reference = upstream_dflash.HFDFlashTargetModel(hf_model, target_layer_ids=layers, capture_logits=True)
    batches = batches_of(rows(6, seed=5), 2)
    run_id = new_run("dflash")
    capture = Capture.dflash(layers, logits=True)
    with Producer([p.url for p in pair], queue_url, run_id, batches, capture=capture) as producer:
        thread, result = produce_in_thread(producer)
        queue, store = open_stream(queue_url, run_id=run_id, wait_for_run=30)
        got = list(DFlashFeatureLoader(queue, store))
        thread.join(60)
        store.close()
    assert "error" not in result, result
    assert len(got) == len(batches)
    by_ids = {tuple(b["input_ids"].flatten().tolist()): b for b in batches}
    for batch in got:
        source = by_ids[tuple(batch.input_ids.flatten().tolist())]
        want = reference.generate_batch(source["input_ids"], source["attention_mask"], source["loss_mask"])
        assert type(batch) is upstream_dflash.DFlashTargetBatch
        for key in ("hidden_states", "logits", "input_ids", "attention_mask", "loss_mask"):
            assert_equal(getattr(batch, key), getattr(want, key), key)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_a_dspark_capture_streams_through_our_loader(
    pair: list[ServerProcess], queue_url: str, hf_model: torch.nn.Module, packed: bool
) -> None:
    """Produced on two appliances, every batch is upstream's ``HFDSparkTargetModel``'s, bit for bit."""
    from eagle3_client.streaming.loader import DSparkFeatureLoader

    layers = [-1, 3, 7]  # the embedding output, a middle layer, the last (post-norm)
    reference = upstream_dspark.HFDSparkTargetModel(hf_model, target_layer_ids=layers)
    batches = batches_of(rows(8, seed=13), 2, packed_sequence_size=48 if packed else 0)
    run_id = new_run("dspark")
    with Producer([p.url for p in pair], queue_url, run_id, batches, capture=Capture.dspark(layers)) as producer:
        thread, result = produce_in_thread(producer)
        queue, store = open_stream(queue_url, run_id=run_id, wait_for_run=30)
        assert (store.description.algorithm, store.description.capture) == ("dspark", "dspark:-1,3,7")
        seen = record_leases(queue)
        got = list(DSparkFeatureLoader(queue, store))
        thread.join(60)
        store.close()
    assert "error" not in result, result
    assert sorted(seen) == [sample_id(0, i) for i in range(len(batches))]
    assert sum(result["report"].per_appliance.values()) == len(batches)
    for sid, batch in zip(seen, got, strict=True):
        source = batches[int(sid.rsplit("-b", 1)[1])]
        packing = {k: source[k] for k in protocol.PACKING_KEYS if k in source}
        assert bool(packing) == packed
        want = reference.generate_batch(source["input_ids"], source["attention_mask"], source["loss_mask"], **packing)
        assert type(batch) is type(want) is upstream_dspark.DSparkTargetBatch
        assert batch.target_hidden_states.shape[-1] == 64 * len(layers)
        for key in ("target_hidden_states", "target_last_hidden_states", "input_ids", "loss_mask"):
            assert_equal(getattr(batch, key), getattr(want, key), key)
        for key in protocol.PACKING_KEYS:
            if packed:
                assert_equal(getattr(batch, key), getattr(want, key), key)
            else:
                assert getattr(batch, key) is None and getattr(want, key) is None, key
    state = queue.backend.state()
    assert state.closed and state.acked == len(batches) and state.redelivered == 0


def test_a_dspark_sample_is_refused_by_a_consumer_of_another_capture(pair: list[ServerProcess], queue_url: str) -> None:
    """DSpark's and DFlash's ``hidden_states`` are different features: neither is read as the other."""
    from eagle3_client.streaming.loader import DFlashFeatureLoader, DSparkFeatureLoader
    from eagle3_client.streaming.store import ApplianceFeatureStore

    batches = batches_of(rows(4, seed=17), 2)
    run_id = new_run("dspark-refused")
    with Producer([pair[0].url], queue_url, run_id, batches, capture=Capture.dspark([-1, 7])) as producer:
        thread, result = produce_in_thread(producer)
        queue, store = open_stream(queue_url, run_id=run_id, wait_for_run=30)
        with pytest.raises(ValueError, match="DSpark batches: use DSparkFeatureLoader"):
            DFlashFeatureLoader(queue, store)
        lease = None
        while lease is None:
            lease = queue.acquire()
            time.sleep(0.05)
        assert lease.ref.algorithm is streaming.refs.FeatureAlgorithm.DSPARK
        assert dict(lease.ref.feature_keys)["target_hidden_states"] == "hidden_states"
        # A consumer opened for a DFlash run: the reference says DSpark, refused before any claim.
        dflash_run = protocol.RunDescription(
            **{**store.description.to_json(), "algorithm": "dflash", "capture": "dflash:0,7"}
        )
        dflash_store = ApplianceFeatureStore(queue.backend, dflash_run)
        with pytest.raises(RunMismatch, match=r"is a dspark sample; this store reads dflash answers"):
            dflash_store.get(lease.ref)
        with pytest.raises(ValueError, match="dflash batches: use DFlashFeatureLoader"):
            DSparkFeatureLoader(queue, dflash_store)
        dflash_store.close()
        # A DSpark consumer of other layers: the appliance refuses the claim (409), named both ways.
        other_layers = protocol.RunDescription(**{**store.description.to_json(), "capture": "dspark:0,5"})
        other_store = ApplianceFeatureStore(queue.backend, other_layers)
        with pytest.raises(RunMismatch, match=r"capture 'dspark:-1,7'.*capture 'dspark:0,5'"):
            other_store.get(lease.ref)
        other_store.close()
        # The run's own consumer still gets the sample, then the rest.
        tensors, _ = store.get(lease.ref)
        assert set(tensors) >= {"target_hidden_states", "target_last_hidden_states", "input_ids", "loss_mask"}
        assert tensors["target_hidden_states"].shape[-1] == 2 * tensors["target_last_hidden_states"].shape[-1]
        queue.ack(lease)
        rest = list(DSparkFeatureLoader(queue, store))
        thread.join(60)
        store.close()
    assert "error" not in result, result
    assert len(rest) == len(batches) - 1


# -- what is refused, and said --------------------------------------------------------------------


def test_errors_name_what_is_wrong(pair: list[ServerProcess], queue_url: str) -> None:
    with pytest.raises(UnknownRun, match="nobody-made-this"):
        open_stream(queue_url, run_id="nobody-made-this", wait_for_run=0)
    batches = batches_of(rows(2, seed=9), 2)
    run_id = new_run("errors")
    with Producer([pair[0].url], queue_url, run_id, batches, vocab_mapping=MAPPING) as producer:
        thread, result = produce_in_thread(producer)
        queue, store = open_stream(queue_url, run_id=run_id, wait_for_run=30)
        lease = None
        while lease is None:
            lease = queue.acquire()
            time.sleep(0.05)
        ref = lease.ref
        bad = streaming.refs.SampleRef(**{**ref.__dict__, "target_model_version": "f" * 16})
        with pytest.raises(RunMismatch, match="refused"):
            store.get(bad)
        elsewhere = streaming.refs.SampleRef(**{**ref.__dict__, "store_uri": "mem://local"})
        with pytest.raises(StreamError, match="mem://local"):
            store.get(elsewhere)
        unknown = streaming.refs.SampleRef(**{**ref.__dict__, "sample_id": "e0000-b99999999"})
        store._claim_timeout = 1.0  # no appliance keeps it, and no producer will move it
        with pytest.raises(UnknownSample, match="e0000-b99999999"):
            store.get(unknown)
        store._claim_timeout = 300.0
        forged = streaming.queue.Lease(ref, lease.deadline, lease.visibility_timeout, 0, "0123456789abcdef")
        with pytest.raises(StreamError, match=ref.sample_id):
            queue.ack(forged)
        tensors, handle = store.get(ref)
        assert tensors["target_probs"].shape[-1] == DRAFT
        queue.ack(lease)
        thread.join(60)
        store.close()
    assert "error" not in result, result


# -- kills ------------------------------------------------------------------------------------


def _start(args: list[str], log: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([PYTHON, *args], cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT, text=True)


def _wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def _acked(out: Path) -> list[tuple[str, str]]:
    """(pid, sample id) of every ack the consumers logged."""
    return [
        (log.stem, line.split()[1])
        for log in out.glob("*.log")
        for line in log.read_text().splitlines()
        if line.startswith("acked ")
    ]


class Watermark:
    """Polls every appliance's resident bytes while a run goes on; the largest seen and the high watermark."""

    def __init__(self, procs: list[ServerProcess]) -> None:
        self.procs, self.peak, self.high, self.stop = procs, 0, None, threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()

    def _poll(self) -> None:
        while not self.stop.is_set():
            for proc in self.procs:
                try:
                    body = httpx.get(proc.url + "/stream/runs", timeout=2).json()
                except httpx.HTTPError:
                    continue
                self.peak = max(self.peak, body["resident_bytes"] + body["reserved_bytes"])
                self.high = body["high_watermark_bytes"]
            time.sleep(0.05)


@pytest.mark.parametrize("backend", ["appliance", "redis"])
def test_every_row_consumed_once_through_a_killed_trainer_and_a_killed_appliance(
    backend: str, cache_dir: Path, colocated: Any, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    data = rows(32, seed=21)
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
    torch.save({"selected_token_ids": MAPPING[0], "selected_token_mask": MAPPING[1]}, tmp_path / "mapping.pt")
    batches = batches_of(data, 2)
    args = ["--cache-dir", str(cache_dir), "--stream-memory-mb", "1"]
    procs = [ServerProcess(args, log_path=tmp_path / f"a{i}.log").start() for i in range(2)]
    out = tmp_path / "out"
    out.mkdir()
    children: list[subprocess.Popen[str]] = []
    try:
        if backend == "redis":
            queue = str(request.getfixturevalue("redis_url"))
        else:
            queue = "appliance://" + procs[0].url[len("http://") :]
        run_id = new_run("kills")
        watermark = Watermark(procs)
        producer = _start(
            ["-m", "eagle3_appliance", "produce", "--urls", ",".join(p.url for p in procs), "--queue", queue,
             "--run-id", run_id, "--dataset", str(tmp_path / "rows.jsonl"), "--batch-size", "2",
             "--vocab-mapping", str(tmp_path / "mapping.pt"), "--visibility-timeout", "3", "--timeout", "240"],
            tmp_path / "producer.log",
        )  # fmt: skip
        children.append(producer)
        consumer = ["-m", "tests.integration.stream_consumer", queue, run_id, str(out)]
        # The steady consumer starts once the holder holds its lease: started together on a loaded
        # machine, the steady one could take the whole run before the holder had imported torch.
        holder = _start([*consumer, "--hold-after", "2"], tmp_path / "holder.log")
        children.append(holder)
        _wait_for(lambda: "holding" in (tmp_path / "holder.log").read_text(), 120, "a consumer holding a lease")
        held = (tmp_path / "holder.log").read_text().split("holding ", 1)[1].split()[0]
        steady = _start([*consumer, "--step-seconds", "0.3"], tmp_path / "steady.log")
        children.append(steady)
        holder.kill()
        _wait_for(lambda: len(_acked(out)) >= 4, 120, "four acked samples")
        procs[1].proc.send_signal(signal.SIGKILL)  # unclaimed answers die with it
        assert producer.wait(240) == 0, (tmp_path / "producer.log").read_text()[-3000:]
        assert steady.wait(60) == 0, (tmp_path / "steady.log").read_text()[-3000:]
        watermark.stop.set()
    finally:
        for child in children:
            child.kill()
        for proc in procs:
            proc.stop()
    acked = _acked(out)
    counts = Counter(sid for _, sid in acked)
    assert sorted(counts) == [sample_id(0, i) for i in range(len(batches))]
    assert set(counts.values()) == {1}, counts  # each sample acked exactly once
    assert held in counts  # the killed trainer's sample was delivered again and consumed
    report = (tmp_path / "producer.log").read_text()
    assert "again after an appliance was lost" in report
    recomputed = int(report.split("(")[-1].split(" again")[0])
    assert recomputed >= 1, report  # the killed appliance held answers nobody had claimed
    assert watermark.high is not None and 0 < watermark.peak <= watermark.high
    for pid, sid in acked:  # bit for bit, whichever appliance and consumer it went through
        saved = torch.load(out / f"{sid}.{pid}.pt")
        source = batches[int(sid.rsplit("-b", 1)[1])]
        inputs = (source["input_ids"], source["attention_mask"], source["loss_mask"])
        for key, value in colocated_supervision(colocated, inputs, *MAPPING).items():
            assert_equal(saved[key], value, f"{sid} {key}")
        assert_equal(saved["attention_mask"], source["attention_mask"], f"{sid} attention_mask")


def test_a_restarted_producer_resumes_and_computes_nothing_twice(
    cache_dir: Path, tmp_path: Path, pair: list[ServerProcess]
) -> None:
    data = rows(24, seed=31)
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
    torch.save({"selected_token_ids": MAPPING[0], "selected_token_mask": MAPPING[1]}, tmp_path / "mapping.pt")
    queue = "appliance://" + pair[0].url[len("http://") :]
    run_id = new_run("restart")
    produced_before = sum(_metric(p.url, "eagle3_stream_produced_total") for p in pair)
    command = ["-m", "eagle3_appliance", "produce", "--urls", ",".join(p.url for p in pair), "--queue", queue,
               "--run-id", run_id, "--dataset", str(tmp_path / "rows.jsonl"), "--batch-size", "2", "--epochs", "2",
               "--vocab-mapping", str(tmp_path / "mapping.pt"), "--timeout", "240"]  # fmt: skip
    out = tmp_path / "out"
    out.mkdir()
    first = _start(command, tmp_path / "first.log")
    consumer = _start(["-m", "tests.integration.stream_consumer", queue, run_id, str(out), "--step-seconds", "0.1"],
                      tmp_path / "consumer.log")  # fmt: skip
    try:
        _wait_for(lambda: len(_acked(out)) >= 5, 120, "five acked samples")
        first.kill()  # mid-run: some samples acked, some kept, some not computed yet
        first.wait(10)
        second = _start(command, tmp_path / "second.log")
        assert second.wait(240) == 0, (tmp_path / "second.log").read_text()[-3000:]
        assert consumer.wait(60) == 0, (tmp_path / "consumer.log").read_text()[-3000:]
    finally:
        for child in (first, consumer):
            child.kill()
    total = 2 * len(batches_of(data, 2))
    counts = Counter(sid for _, sid in _acked(out))
    assert len(counts) == total and set(counts.values()) == {1}
    produced = sum(_metric(p.url, "eagle3_stream_produced_total") for p in pair) - produced_before
    assert produced == total  # not one sample computed twice across the restart
    assert "already on the queue" in (tmp_path / "second.log").read_text()


def _metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics").text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith((name + " ", name + "{")))


def test_a_frozen_appliance_holds_back_only_its_own_samples(cache_dir: Path, colocated: Any, tmp_path: Path) -> None:
    """SIGSTOP one of two appliances once every sample is on the queue: the trainer (reading one
    ahead) takes every sample of the other while it stays frozen, although its one reader's claim
    went to the frozen appliance and stalls there (claims time out after a minute here); the frozen
    appliance's samples are computed again on the other; every sample is trained once, bit for bit."""
    batches = batches_of(rows(32, seed=41), 2)
    procs = [ServerProcess(["--cache-dir", str(cache_dir)], log_path=tmp_path / f"a{i}.log").start() for i in range(2)]
    queue_url = "appliance://" + procs[0].url[len("http://") :]
    frozen_uri = "appliance://" + procs[1].url[len("http://") :]
    run_id = new_run("freeze")
    got: dict[str, Any] = {}
    thawed = threading.Event()
    by_watchdog: list[bool] = []

    def thaw(watchdog: bool) -> None:
        if not thawed.is_set():
            thawed.set()
            by_watchdog.append(watchdog)
            procs[1].proc.send_signal(signal.SIGCONT)

    watchdog = threading.Timer(45.0, thaw, (True,))
    try:
        # In order: the queue hands the samples out in id order, so which come after the frozen
        # appliance's first one is known.
        with Producer(
            [p.url for p in procs], queue_url, run_id, batches, vocab_mapping=MAPPING, in_order=True
        ) as producer:
            thread, result = produce_in_thread(producer)

            def all_put() -> bool:
                try:
                    return producer.queue.state().pending == len(batches)
                except UnknownRun:  # the producer has not opened it yet
                    return False

            _wait_for(all_put, 60, "every sample on the queue")
            where = {s.sample_id: s.store_uri for s in producer.queue.samples()}
            frozen = sorted(sid for sid, uri in where.items() if uri == frozen_uri)
            others = sorted(sid for sid, uri in where.items() if uri != frozen_uri)
            assert frozen and others and others[-1] > frozen[0], where  # some wait behind a frozen one
            procs[1].proc.send_signal(signal.SIGSTOP)
            watchdog.start()
            queue, store = open_stream(queue_url, run_id=run_id, wait_for_run=30, read_ahead=1, generate_timeout=60.0)
            last = record_leases(queue)
            for batch in streaming.FeatureDataLoader(queue, store):
                got[last[-1]] = batch
                if set(others) <= set(got) and producer.report.recomputed >= 1:
                    thaw(False)
                time.sleep(0.1)
            thread.join(120)
            queue.close()
            store.close()
    finally:
        watchdog.cancel()
        procs[1].proc.send_signal(signal.SIGCONT)
        for proc in procs:
            proc.stop()
    assert "error" not in result, result
    assert sorted(got) == [sample_id(0, i) for i in range(len(batches))] and len(last) == len(batches)
    # Before the appliance came back: every sample of the other one was trained, and the frozen
    # one's samples were being computed again elsewhere.
    assert by_watchdog == [False]
    assert result["report"].recomputed >= 1
    for sid, batch in got.items():
        source = batches[int(sid.rsplit("-b", 1)[1])]
        inputs = (source["input_ids"], source["attention_mask"], source["loss_mask"])
        for key, value in colocated_supervision(colocated, inputs, *MAPPING).items():
            assert_equal(getattr(batch, key), value, f"{sid} {key}")


def test_acks_are_not_held_up_by_a_frozen_appliance(cache_dir: Path, tmp_path: Path) -> None:
    """The trainer acks a sample of an appliance that has just frozen: telling that appliance to
    drop the answer cannot hold back the acks of the samples trained after it (acked behind, on
    the queue hosted elsewhere), or their leases (3 s) run out and they are handed out again."""
    batches = batches_of(rows(80, seed=43), 2)
    procs = [ServerProcess(["--cache-dir", str(cache_dir)], log_path=tmp_path / f"a{i}.log").start() for i in range(2)]
    queue_url = "appliance://" + procs[0].url[len("http://") :]
    frozen_uri = "appliance://" + procs[1].url[len("http://") :]
    run_id = new_run("ackfreeze")
    trained: list[str] = []
    try:
        with Producer(
            [p.url for p in procs], queue_url, run_id, batches, vocab_mapping=MAPPING, visibility_timeout=3.0
        ) as producer:
            thread, result = produce_in_thread(producer)
            queue, store = open_stream(queue_url, run_id=run_id, wait_for_run=30, read_ahead=2)
            last = record_leases(queue)
            for _ in streaming.FeatureDataLoader(queue, store):
                trained.append(last[-1])
                if (
                    not any(t.is_alive() for t in threading.enumerate() if t.name == "thaw")
                    and queue.backend.locate(last[-1]).store_uri == frozen_uri  # type: ignore[union-attr]
                    and len(trained) < 10
                ):
                    procs[1].proc.send_signal(signal.SIGSTOP)  # before the loader acks this sample
                    thaw = threading.Timer(8.0, procs[1].proc.send_signal, (signal.SIGCONT,))
                    thaw.name = "thaw"
                    thaw.start()
                time.sleep(0.1)
            thread.join(120)
            queue.close()
            store.close()
    finally:
        procs[1].proc.send_signal(signal.SIGCONT)
        for proc in procs:
            proc.stop()
    assert "error" not in result, result
    assert sorted(trained) == [sample_id(0, i) for i in range(len(batches))]  # each once


def test_samples_in_flight_on_a_frozen_appliance_are_computed_elsewhere(cache_dir: Path, tmp_path: Path) -> None:
    """An appliance freezes as the run starts: the producer's requests already sent to it are
    computed again on the other appliance, and nothing more is sent to it while it is silent, so
    the whole run is trained while it stays frozen (its requests would otherwise wait minutes)."""
    batches = batches_of(rows(24, seed=47), 2)
    procs = [ServerProcess(["--cache-dir", str(cache_dir)], log_path=tmp_path / f"a{i}.log").start() for i in range(2)]
    queue_url = "appliance://" + procs[0].url[len("http://") :]
    run_id = new_run("inflight")
    trained: list[str] = []
    by_watchdog: list[bool] = []

    def thaw(watchdog: bool) -> None:
        if not by_watchdog:
            by_watchdog.append(watchdog)
            procs[1].proc.send_signal(signal.SIGCONT)

    watchdog = threading.Timer(45.0, thaw, (True,))
    try:
        with Producer([p.url for p in procs], queue_url, run_id, batches, vocab_mapping=MAPPING) as producer:
            # Its first requests to the second appliance block at once: frozen before the run opens.
            frozen = threading.Event()
            original = producer._connect

            def connect_then_freeze() -> None:
                original()
                procs[1].proc.send_signal(signal.SIGSTOP)
                frozen.set()

            producer._connect = connect_then_freeze  # type: ignore[method-assign]
            thread, result = produce_in_thread(producer)
            assert frozen.wait(60)
            watchdog.start()
            queue, store = open_stream(queue_url, run_id=run_id, wait_for_run=30, read_ahead=2)
            last = record_leases(queue)
            for _ in streaming.FeatureDataLoader(queue, store):
                trained.append(last[-1])
                if len(trained) == len(batches):
                    thaw(False)
            thread.join(120)
            queue.close()
            store.close()
    finally:
        watchdog.cancel()
        procs[1].proc.send_signal(signal.SIGCONT)
        for proc in procs:
            proc.stop()
    assert "error" not in result, result
    assert by_watchdog == [False]  # every sample trained while the appliance was frozen
    assert sorted(trained) == [sample_id(0, i) for i in range(len(batches))]
    assert result["report"].recomputed >= 1  # what it had been sent was computed again
