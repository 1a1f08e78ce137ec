"""Answers kept resident for runs' streams: produced once, claimed as /generate would answer, bounded.

Real servers over loopback (``/stream/produce``, a claim = ``/generate`` with ``X-Eagle3-Sample``
and an empty body, ``/stream/release``, ``/stream/runs``), and :class:`ResidentAnswers` alone.
A claimed answer is compared tensor for tensor with what ``/generate`` answers for the same
batch through the same client, on the wire and gloo data planes.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from eagle3_appliance.core.inputs import GenerateInputs, Packing, VocabMapping
from eagle3_appliance.launch import ServerProcess
from eagle3_appliance.model.limits import TargetShape
from eagle3_appliance.serving.stream_answers import estimate_bytes
from eagle3_appliance.stream.resident import KeptAnswer, NoKeptAnswer, ResidentAnswers, StreamFull
from eagle3_client import (
    RemoteDFlashTargetModel,
    RemoteDSparkTargetModel,
    RemoteEagle3TargetModel,
    TargetOverloaded,
    protocol,
    wire,
)
from eagle3_client.capture import EAGLE3, Capture
from eagle3_client.encodings import parse_encoding
from eagle3_client.remote.core import RemoteTarget
from eagle3_client.remote.request import encode_request
from eagle3_client.synthetic import packed_batch, random_batch, vocab_mapping
from tests.ops_support import metric, scrape

VOCAB = 1024
DRAFT = 256
MAPPING = vocab_mapping(VOCAB, DRAFT, seed=1)
MAPPING_BODY = wire.encode(dict(zip(protocol.VOCAB_MAPPING_KEYS, MAPPING, strict=True)))
PACKED_ROWS = [[10, 6], [16], [4, 4, 5]]  # documents per row (tokens); rows of 16
SAMPLE = protocol.SAMPLE_HEADER
FULL = protocol.STREAM_FULL_HEADER
STREAM = (protocol.CAPABILITY_STREAM,)


# -- servers and clients ------------------------------------------------------------------


def _serve(cache_dir: Path, tmp: pytest.TempPathFactory, name: str, *args: str) -> ServerProcess:
    log = tmp.mktemp("logs") / f"{name}.log"
    return ServerProcess(["--cache-dir", str(cache_dir), "--max-seq-len", "512", *args], log_path=log)


@pytest.fixture(scope="module")
def stream_server(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """Room for every answer these tests keep (the default watermark)."""
    with _serve(cache_dir, tmp_path_factory, "stream") as proc:
        yield proc


@pytest.fixture(scope="module")
def small_server(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A 1 MiB high watermark (low: 0.75 MiB): some twenty answers of 25 tokens."""
    with _serve(cache_dir, tmp_path_factory, "small", "--stream-memory-mb", "1") as proc:
        yield proc


@pytest.fixture(scope="module")
def off_server(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with _serve(cache_dir, tmp_path_factory, "off", "--stream-memory-mb", "0") as proc:
        yield proc


def eagle3_target(url: str, encoding: str = "probs", plane: str = "wire") -> RemoteEagle3TargetModel:
    model = RemoteEagle3TargetModel.from_urls([url], encoding=encoding, data_plane=plane, max_retries=0)
    model.set_vocab_mapping(*MAPPING)  # connects
    return model


def dflash_target(url: str, capture: Capture, plane: str = "wire") -> RemoteDFlashTargetModel:
    model = RemoteDFlashTargetModel.from_urls(
        [url], target_layer_ids=capture.layers, capture_logits=capture.logits, data_plane=plane, max_retries=0
    )
    model._fleet.start()
    return model


def dspark_target(url: str, capture: Capture, plane: str = "wire") -> RemoteDSparkTargetModel:
    model = RemoteDSparkTargetModel.from_urls([url], target_layer_ids=capture.layers, data_plane=plane, max_retries=0)
    model._fleet.start()
    return model


def produce(target: RemoteTarget, run_id: str, sample_id: str, payload: bytes) -> protocol.StreamRef:
    target._fleet.start()
    return target._servers[0].produce(run_id, sample_id, payload)


class RawSession:
    """A session on ``httpx`` (status codes and headers as the server sent them)."""

    def __init__(
        self,
        url: str,
        *,
        encoding: str = "probs",
        capture: Capture = EAGLE3,
        capabilities: tuple[str, ...] = STREAM,
    ) -> None:
        self.http = httpx.Client(base_url=url, timeout=60, trust_env=False)
        offer = protocol.SessionOffer(
            client="stream-test", encoding=encoding, capture=capture, capabilities=capabilities
        )
        reply = self.http.post("/session", json=offer.to_json())
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert body["encoding"] == encoding
        assert tuple(body.get("capabilities", ())) == capabilities
        self.headers = {protocol.SESSION_HEADER: body["session_id"]}
        if capture.is_eagle3:
            resp = self.http.post("/set_vocab_mapping", content=MAPPING_BODY, headers=self.headers)
            assert resp.status_code == 200, resp.text

    def produce(self, run_sample: str, payload: bytes) -> httpx.Response:
        return self.http.post("/stream/produce", content=payload, headers={**self.headers, SAMPLE: run_sample})

    def claim(self, run_sample: str, body: bytes = b"") -> httpx.Response:
        return self.http.post("/generate", content=body, headers={**self.headers, SAMPLE: run_sample})

    def close(self) -> None:
        self.http.post("/disconnect", json={}, headers=self.headers)
        self.http.close()


def runs(url: str) -> dict[str, Any]:
    resp = httpx.get(url + "/stream/runs", trust_env=False, timeout=10)
    assert resp.status_code == 200, resp.text
    body: dict[str, Any] = resp.json()
    return body


def release(url: str, run_id: str, sample_ids: list[str]) -> int:
    resp = httpx.post(url + "/stream/release", json={"run_id": run_id, "sample_ids": sample_ids}, trust_env=False)
    assert resp.status_code == 200, resp.text
    released: int = resp.json()["released"]
    return released


def healthy(url: str) -> bool:
    return httpx.get(url + "/health", trust_env=False, timeout=10).status_code == 200


def nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def assert_same(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape, (what, got.dtype, got.shape, want.dtype, want.shape)
    assert torch.equal(got, want), what


# -- kept answer == computed answer ---------------------------------------------------------

# name: (capture, encoding, packed)
CASES: dict[str, tuple[Capture, str, bool]] = {
    "probs": (EAGLE3, "probs", False),
    "topk": (EAGLE3, "topk:8", False),
    "logits": (EAGLE3, "logits", False),
    "packed": (EAGLE3, "probs", True),
    "dflash": (Capture.dflash([3]), "probs", False),
    "dflash-logits": (Capture.dflash([5, 0, 2], logits=True), "probs", False),
    "dflash-packed": (Capture.dflash([1, 4], logits=True), "probs", True),
    # int32 ids, bool attention mask, int8 loss mask: kept and sent back in the dtypes they came in.
    "narrow": (EAGLE3, "topk:8", False),
    "dflash-narrow": (Capture.dflash([2]), "probs", False),
    # DSpark: the embedding output (-1), a middle layer and the last (post-norm), plus the final norm.
    "dspark": (Capture.dspark([-1, 3, 7]), "probs", False),
    "dspark-packed": (Capture.dspark([0, 5]), "probs", True),
}
# A DSpark answer's tensors by the names of upstream's DSpark stream schema (ref and store).
DSPARK_NAMES = {"hidden_states": "target_hidden_states", "last_hidden_states": "target_last_hidden_states"}


@pytest.fixture(scope="module")
def targets(stream_server: ServerProcess) -> Iterator[Callable[[str, str], RemoteTarget]]:
    """One client per (case, data plane), made on first use and closed with the module."""
    made: dict[tuple[str, str], RemoteTarget] = {}

    def get(case: str, plane: str) -> RemoteTarget:
        if (case, plane) not in made:
            capture, encoding, _ = CASES[case]
            if capture.is_eagle3:
                made[case, plane] = eagle3_target(stream_server.url, encoding, plane)
            elif capture.is_dspark:
                made[case, plane] = dspark_target(stream_server.url, capture, plane)
            else:
                made[case, plane] = dflash_target(stream_server.url, capture, plane)
        return made[case, plane]

    yield get
    for target in made.values():
        target.close()


def batch_args(case: str, seed: int) -> tuple[torch.Tensor, ...]:
    if CASES[case][2]:
        packed = packed_batch(VOCAB, PACKED_ROWS, 16, seed=seed)
        return tuple(packed[k] for k in (*protocol.GENERATE_INPUT_KEYS, *protocol.PACKING_KEYS))
    input_ids, attention_mask, loss_mask = random_batch(VOCAB, 3, 20, seed=seed, pad=True)
    if case.endswith("narrow"):
        return input_ids.int(), attention_mask.bool(), loss_mask.to(torch.int8)
    return input_ids, attention_mask, loss_mask


def decoded(target: RemoteTarget, case: str, answer: Any, args: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
    """What a consumer's store returns for a claimed answer: the decoded supervision and the request's tensors."""
    capture = CASES[case][0]
    requested = {k: answer.tensors[k] for k in protocol.SAMPLE_INPUT_KEYS if k in answer.tensors}
    if capture.is_dspark:
        return {DSPARK_NAMES.get(k, k): t for k, t in answer.tensors.items()}
    if not capture.is_eagle3:
        return dict(answer.tensors)
    _, _, packing = encode_request(*args, capture=capture)
    batch = target._to_batch(answer, args[0], args[1], args[2], packing)
    return {
        "aux_hidden_states": answer.tensors["aux_hidden_states"],
        "target_probs": batch.target_probs,
        "position_mask": batch.position_mask,
        **requested,
    }


def reserved_estimate(capture: Capture, encoding: str, args: tuple[torch.Tensor, ...]) -> int:
    """What ``/stream/produce`` reserves for this batch (the built-in model: H 64, V 1024, float32)."""
    shape = TargetShape(
        max_position_embeddings=None, vocab_size=VOCAB, hidden_size=64, intermediate_size=None, dtype_bytes=4
    )
    packing = Packing(*args[3:]) if len(args) > 3 else None
    inputs = GenerateInputs(args[0], args[1], args[2], packing)
    return estimate_bytes(shape, capture, parse_encoding(encoding), VocabMapping(*MAPPING), inputs)


@pytest.mark.parametrize("plane", ["wire", "gloo"])
@pytest.mark.parametrize("case", list(CASES))
def test_a_claimed_answer_is_the_computed_one(
    stream_server: ServerProcess, targets: Callable[[str, str], RemoteTarget], case: str, plane: str
) -> None:
    capture, encoding, packed = CASES[case]
    producer, consumer = targets(case, "wire"), targets(case, plane)
    args = batch_args(case, seed=len(case) + (7 if plane == "gloo" else 0))
    request, payload, packing = encode_request(*args, capture=capture)
    run_id = f"eq-{case}-{plane}"

    ref = produce(producer, run_id, "s0", payload)
    claimed = consumer.claim(run_id, "s0")
    assert consumer.transport_stats()[0]["tier"] == plane
    computed = consumer._generate(payload, request.capabilities)

    # The supervision as /generate sends it, bit for bit; the request's tensors beside it, unchanged.
    request_keys = set(protocol.GENERATE_INPUT_KEYS) | (set(protocol.PACKING_KEYS) if packed else set())
    assert set(claimed.tensors) == set(computed.tensors) | request_keys
    for key, want in computed.tensors.items():
        assert_same(claimed.tensors[key], want, key)
    # (EAGLE-3's answer carries input_ids and loss_mask already, shifted as upstream's: compared above.)
    sent = dict(zip((*protocol.GENERATE_INPUT_KEYS, *protocol.PACKING_KEYS), args, strict=False))
    assert "attention_mask" not in computed.tensors
    for key in request_keys - set(computed.tensors):
        assert_same(claimed.tensors[key], sent[key], key)

    # The recipe's batch from the claim is the batch generate_batch returns.
    from_claim = consumer._to_batch(claimed, args[0], args[1], args[2], packing)
    from_generate = consumer.generate_batch(*args)
    fields: tuple[str, ...]
    if capture.is_dspark:  # DSparkTargetBatch has no attention mask
        fields = ("target_hidden_states", "target_last_hidden_states", "input_ids", "loss_mask")
    elif capture.is_eagle3:
        fields = ("aux_hidden_states", "target_probs", "position_mask", "input_ids", "attention_mask", "loss_mask")
    else:
        fields = ("hidden_states", "input_ids", "attention_mask", "loss_mask")
    fields += protocol.PACKING_KEYS if packed else ()
    fields += ("logits",) if capture.logits else ()
    for name in fields:
        assert_same(getattr(from_claim, name), getattr(from_generate, name), name)
    if capture.kind == "dflash" and not capture.logits:
        assert from_claim.logits is None

    # A redelivery: the same tensors again.
    again = consumer.claim(run_id, "s0")
    assert set(again.tensors) == set(claimed.tensors)
    for key, tensor in claimed.tensors.items():
        assert_same(again.tensors[key], tensor, key)

    # The reference describes the store's decoded view exactly; the server keeps what it sends.
    store = decoded(consumer, case, claimed, args)
    assert ref.feature_specs == {k: (tuple(t.shape), str(t.dtype).removeprefix("torch.")) for k, t in store.items()}
    wire_keys = {v: k for k, v in DSPARK_NAMES.items()} if capture.is_dspark else {}
    assert ref.feature_keys == {k: wire_keys.get(k, k) for k in store}
    if capture.is_eagle3:
        assert ref.feature_specs["target_probs"] == ((*args[0].shape, DRAFT), "float32")
        assert ref.feature_specs["position_mask"] == ((*args[0].shape, 1), "bool")
    algorithm = "eagle3" if capture.is_eagle3 else "dspark" if capture.is_dspark else "dflash"
    assert (ref.run_id, ref.sample_id, ref.algorithm) == (run_id, "s0", algorithm)
    if capture.is_dspark:  # [B,T,n*H] and [B,T,H] of the built-in model (H 64, float32)
        assert ref.feature_specs["target_hidden_states"] == ((*args[0].shape, 64 * len(capture.layers)), "float32")
        assert ref.feature_specs["target_last_hidden_states"] == ((*args[0].shape, 64), "float32")
    assert ref.store_uri == "appliance://" + stream_server.url.removeprefix("http://")
    assert ref.num_tokens == int(args[1].sum())
    assert ref.estimated_bytes == nbytes(store)
    resident = runs(stream_server.url)["runs"][run_id]
    assert resident == {"samples": 1, "bytes": nbytes(claimed.tensors)}
    if encoding == "probs":  # the kept answer is the decoded one: one size
        assert ref.estimated_bytes == resident["bytes"]
    # The room reserved before the forward (from the request alone) is the kept answer's size, exactly.
    assert reserved_estimate(capture, encoding, args) == resident["bytes"]
    assert httpx.delete(f"{stream_server.url}/stream/runs/{run_id}", trust_env=False).json()["dropped"] == 1


def test_a_kept_answer_outlives_the_computations_after_it(stream_server: ServerProcess) -> None:
    """The kept tensors are the answer's own memory: later forwards of the same shape do not reuse it."""
    first, second = random_batch(VOCAB, 2, 24, seed=21), random_batch(VOCAB, 2, 24, seed=22)
    with eagle3_target(stream_server.url) as model:
        produce(model, "outlive", "s0", encode_request(*first)[1])
        produce(model, "outlive", "s1", encode_request(*second)[1])
        model.generate_batch(*second)
        claimed = model._to_batch(model.claim("outlive", "s0"), *first, None)
        want = model.generate_batch(*first)
        for name in ("aux_hidden_states", "target_probs", "position_mask", "input_ids", "loss_mask"):
            assert_same(getattr(claimed, name), getattr(want, name), name)
        assert not torch.equal(claimed.aux_hidden_states, model.generate_batch(*second).aux_hidden_states)
    assert httpx.delete(stream_server.url + "/stream/runs/outlive", trust_env=False).json()["dropped"] == 2


def test_concurrent_produces_of_one_sample_keep_one_answer(stream_server: ServerProcess) -> None:
    url = stream_server.url
    payload = encode_request(*random_batch(VOCAB, 2, 32, seed=31))[1]
    session = RawSession(url)
    try:
        before = scrape(url)
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            replies = list(pool.map(lambda _: session.produce("race/s0", payload), range(4)))
        assert [r.status_code for r in replies] == [200] * 4, [r.text for r in replies]
        assert all(r.json() == replies[0].json() for r in replies)
        state = runs(url)
        assert state["reserved_bytes"] == 0
        assert state["runs"]["race"] == {"samples": 1, "bytes": replies[0].json()["estimated_bytes"]}
        assert metric(scrape(url), "eagle3_stream_produced_total") - metric(before, "eagle3_stream_produced_total") == 1
    finally:
        session.close()
        httpx.delete(url + "/stream/runs/race", trust_env=False)


# -- computed once -------------------------------------------------------------------------


def test_a_sample_is_computed_once(stream_server: ServerProcess) -> None:
    url = stream_server.url
    with eagle3_target(url) as producer:
        _, payload, _ = encode_request(*random_batch(VOCAB, 2, 16, seed=3))
        before = scrape(url)
        first = produce(producer, "once", "s0", payload)
        second = produce(producer, "once", "s0", payload)
        after = scrape(url)
        assert first == second
        for name in ("eagle3_stream_produced_total", "eagle3_inference_exec_count_total"):
            assert metric(after, name) - metric(before, name) == 1, name
        assert (
            metric(after, "eagle3_stream_resident", unit="samples")
            - metric(before, "eagle3_stream_resident", unit="samples")
            == 1
        )
        assert runs(url)["runs"]["once"] == {"samples": 1, "bytes": first.estimated_bytes}
        producer.claim("once", "s0")
        producer.claim("once", "s0")
        assert metric(scrape(url), "eagle3_stream_claimed_total") - metric(after, "eagle3_stream_claimed_total") == 2
        assert metric(scrape(url), "eagle3_inference_exec_count_total") == metric(
            after, "eagle3_inference_exec_count_total"
        )  # a claim runs no forward
    assert httpx.get(url + "/stream/runs/once", trust_env=False).json() == {"run_id": "once", "samples": ["s0"]}
    assert release(url, "once", ["s0"]) == 1
    assert "once" not in runs(url)["runs"]


# -- watermarks ----------------------------------------------------------------------------


def _watermark_payload(seed: int) -> bytes:
    return encode_request(*random_batch(VOCAB, 1, 25, seed=seed, pad=False))[1]


def test_producers_are_refused_at_the_high_watermark_until_the_low_one(small_server: ServerProcess) -> None:
    url = small_server.url
    session = RawSession(url)
    try:
        state = runs(url)
        high, low = state["high_watermark_bytes"], state["low_watermark_bytes"]
        assert (high, low) == (1 << 20, int((1 << 20) * 0.75))
        before = scrape(url)

        produced = 0
        while True:
            resp = session.produce(f"wm/s{produced}", _watermark_payload(produced))
            state = runs(url)
            assert state["resident_bytes"] + state["reserved_bytes"] <= high
            if resp.status_code != 200:
                break
            produced += 1
            assert produced < 100, "a 1 MiB watermark never refused"
        assert produced >= 10, produced
        assert resp.status_code == 503, resp.text
        assert resp.headers[FULL] == "high" and int(resp.headers["Retry-After"]) >= 1
        assert "high watermark" in resp.json()["error"] and "resuming below" in resp.json()["error"]
        assert state["paused"] and state["runs"]["wm"]["samples"] == produced
        per_sample = state["resident_bytes"] // produced
        assert state["resident_bytes"] == produced * per_sample
        samples = scrape(url)
        assert metric(samples, "eagle3_stream_paused") == 1
        assert metric(samples, "eagle3_stream_resident", unit="bytes") == state["resident_bytes"]
        assert metric(samples, "eagle3_stream_refused_total") - metric(before, "eagle3_stream_refused_total") == 1

        # The client's producer sees the refusal as an overloaded server (its caller decides).
        with eagle3_target(url) as producer:
            with pytest.raises(TargetOverloaded, match="high watermark") as info:
                produce(producer, "wm", "by-client", _watermark_payload(500))
            assert info.value.status == 503

        # Hysteresis: one release makes room under the high watermark, but producers stay refused
        # until the resident answers are at or below the low one.
        released = 0
        while state["resident_bytes"] > low:
            assert release(url, "wm", [f"s{released}"]) == 1
            released += 1
            state = runs(url)
            if state["resident_bytes"] <= low:
                break
            assert state["resident_bytes"] + per_sample < high  # it would fit: only the hysteresis refuses
            resp = session.produce(f"wm/refused{released}", _watermark_payload(1000 + released))
            assert resp.status_code == 503 and resp.headers[FULL] == "high", resp.text
        assert released >= 2, "the low watermark is more than one sample below the high one"
        # At the low watermark producers are admitted again: the state and the gauge say so at once,
        # before any producer tries (one waiting on them would otherwise wait forever).
        assert not runs(url)["paused"]
        assert metric(scrape(url), "eagle3_stream_paused") == 0
        resp = session.produce("wm/resumed", _watermark_payload(2000))
        assert resp.status_code == 200, resp.text
        state = runs(url)
        assert not state["paused"] and state["runs"]["wm"]["samples"] == produced - released + 1
        samples = scrape(url)
        assert metric(samples, "eagle3_stream_paused") == 0
        acked = metric(samples, "eagle3_stream_released_total", reason="acked")
        assert acked - metric(before, "eagle3_stream_released_total", reason="acked") == released

        # The run ends: every answer left goes.
        left = produced - released + 1
        resp = httpx.delete(url + "/stream/runs/wm", trust_env=False)
        assert resp.status_code == 200 and resp.json() == {"run_id": "wm", "dropped": left}
        state = runs(url)
        assert (state["resident_bytes"], state["resident_samples"], state["runs"]) == (0, 0, {})
        ended = metric(scrape(url), "eagle3_stream_released_total", reason="run_ended")
        assert ended - metric(before, "eagle3_stream_released_total", reason="run_ended") == left
        assert httpx.get(url + "/stream/runs/wm", trust_env=False).status_code == 404
        assert healthy(url)
    finally:
        session.close()


def test_an_answer_larger_than_the_whole_budget_is_refused_as_too_large(small_server: ServerProcess) -> None:
    session = RawSession(small_server.url)
    try:
        before = metric(scrape(small_server.url), "eagle3_inference_exec_count_total")
        payload = encode_request(*random_batch(VOCAB, 5, 128, seed=4, pad=False))[1]  # 640 tokens: ~1.1 MiB
        resp = session.produce("big/s0", payload)
        assert resp.status_code == 503, resp.text
        assert resp.headers[FULL] == "too-large" and "Retry-After" in resp.headers
        assert "larger than --stream-memory-mb" in resp.json()["error"]
        assert metric(scrape(small_server.url), "eagle3_inference_exec_count_total") == before
        assert runs(small_server.url)["reserved_bytes"] == 0
        assert "big" not in runs(small_server.url)["runs"]
    finally:
        session.close()


def test_a_server_without_stream_memory_refuses_as_disabled(off_server: ServerProcess) -> None:
    session = RawSession(off_server.url)
    try:
        resp = session.produce("off/s0", _watermark_payload(1))
        assert resp.status_code == 503, resp.text
        assert resp.headers[FULL] == "disabled"
        assert "--stream-memory-mb 0" in resp.json()["error"]
        assert runs(off_server.url)["high_watermark_bytes"] == 0
        assert healthy(off_server.url)
    finally:
        session.close()


# -- bad requests --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kept(stream_server: ServerProcess) -> Iterator[RawSession]:
    """A probs session with the stream capability and one kept answer: ``bad/s0``."""
    session = RawSession(stream_server.url)
    resp = session.produce("bad/s0", encode_request(*random_batch(VOCAB, 2, 12, seed=9))[1])
    assert resp.status_code == 200, resp.text
    yield session
    session.close()
    httpx.delete(stream_server.url + "/stream/runs/bad", trust_env=False)


def _refused(resp: httpx.Response, status: int, *needles: str) -> None:
    assert resp.status_code == status, (resp.status_code, resp.text)
    error = resp.json()["error"]
    for needle in needles:
        assert needle in error, (needle, error)


def test_a_raw_claim_is_the_kept_answer_on_the_wire(kept: RawSession) -> None:
    resp = kept.claim("bad/s0")
    assert resp.status_code == 200, resp.text
    tensors = wire.decode(resp.content)
    assert set(tensors) == {"aux_hidden_states", "target_probs", "position_mask", *protocol.GENERATE_INPUT_KEYS}


def test_claims_of_what_is_not_kept_are_404s_naming_it(stream_server: ServerProcess, kept: RawSession) -> None:
    _refused(kept.claim("nope/s0"), 404, "run 'nope'")
    _refused(kept.claim("bad/zzz"), 404, "sample 'zzz'", "run 'bad'")
    assert httpx.get(stream_server.url + "/stream/runs/nope", trust_env=False).status_code == 404
    assert httpx.delete(stream_server.url + "/stream/runs/nope", trust_env=False).json()["dropped"] == 0
    assert healthy(stream_server.url)


def test_a_claim_with_a_body_is_a_400(stream_server: ServerProcess, kept: RawSession) -> None:
    _refused(kept.claim("bad/s0", b"not empty"), 400, "empty body", "9 bytes")
    assert healthy(stream_server.url)


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        ("no-slash", "'<run_id>/<sample_id>'"),
        ("bad/s 0", "the sample id"),
        ("b*d/s0", "the run id"),
        ("bad/", "the sample id"),
        ("r" * (protocol.STREAM_ID_MAX_LEN + 1) + "/s0", "the run id"),
        ("bad/" + "s" * (protocol.STREAM_ID_MAX_LEN + 1), "the sample id"),
    ],
)
def test_a_malformed_sample_header_is_a_400(
    stream_server: ServerProcess, kept: RawSession, value: str, needle: str
) -> None:
    _refused(kept.claim(value), 400, needle)
    _refused(kept.produce(value, encode_request(*random_batch(VOCAB, 1, 8, seed=1))[1]), 400, needle)
    assert healthy(stream_server.url)


def test_stream_requests_need_a_session_granted_the_stream_capability(
    stream_server: ServerProcess, kept: RawSession
) -> None:
    url = stream_server.url
    payload = encode_request(*random_batch(VOCAB, 1, 8, seed=1))[1]
    for resp in (
        httpx.post(url + "/generate", headers={SAMPLE: "bad/s0"}, trust_env=False),
        httpx.post(url + "/stream/produce", content=payload, headers={SAMPLE: "bad/s1"}, trust_env=False),
    ):
        _refused(resp, 409, "'stream' capability")
    plain = RawSession(url, capabilities=())
    try:
        _refused(plain.claim("bad/s0"), 409, "'stream' capability")
        _refused(plain.produce("bad/s1", payload), 409, "'stream' capability")
    finally:
        plain.close()
    assert "s1" not in httpx.get(url + "/stream/runs/bad", trust_env=False).json()["samples"]
    assert healthy(url)


def test_a_claim_from_another_encoding_or_capture_is_a_409_naming_both(
    stream_server: ServerProcess, kept: RawSession
) -> None:
    topk = RawSession(stream_server.url, encoding="topk:8")
    dflash = RawSession(stream_server.url, capture=Capture.dflash([1, 2], logits=True))
    dspark = RawSession(stream_server.url, capture=Capture.dspark([1, 2]))
    claimed_before = metric(scrape(stream_server.url), "eagle3_stream_claimed_total")
    try:
        _refused(topk.claim("bad/s0"), 409, "encoding 'probs'", "encoding 'topk:8'")
        _refused(dflash.claim("bad/s0"), 409, "capture 'eagle3'", "capture 'dflash+logits:1,2'")
        _refused(dspark.claim("bad/s0"), 409, "capture 'eagle3'", "capture 'dspark:1,2'")
        # A second produce of the kept sample from such a session is refused the same way.
        payload = encode_request(*random_batch(VOCAB, 2, 12, seed=9))[1]
        _refused(topk.produce("bad/s0", payload), 409, "encoding 'probs'", "encoding 'topk:8'")
        _refused(topk.claim("bad/nope"), 404, "sample 'nope'")
        # Nothing was sent: no claim is counted.
        assert metric(scrape(stream_server.url), "eagle3_stream_claimed_total") == claimed_before
    finally:
        topk.close()
        dflash.close()
        dspark.close()
    assert kept.claim("bad/s0").status_code == 200  # the producer's own encoding still gets it
    assert metric(scrape(stream_server.url), "eagle3_stream_claimed_total") == claimed_before + 1
    assert healthy(stream_server.url)


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"run_id": "bad", "sample_ids": "s0"}, "'sample_ids'"),
        ({"run_id": "bad", "sample_ids": [1, 2]}, "'sample_ids'"),
        ({"run_id": "bad", "sample_ids": ["s"] * (protocol.MAX_STREAM_IDS_PER_REQUEST + 1)}, "at most 10000"),
        ({"run_id": "bad", "sample_ids": ["a/b"]}, "a sample id"),
        ({"run_id": "b*d", "sample_ids": ["s0"]}, "'run_id'"),
        ({"sample_ids": ["s0"]}, "run_id"),
        (["bad", "s0"], "object"),
    ],
)
def test_a_malformed_release_is_refused_and_drops_nothing(
    stream_server: ServerProcess, kept: RawSession, body: Any, needle: str
) -> None:
    resp = httpx.post(stream_server.url + "/stream/release", json=body, trust_env=False)
    assert 400 <= resp.status_code < 500, resp.text
    assert needle in resp.json()["error"]
    assert runs(stream_server.url)["runs"]["bad"]["samples"] == 1
    assert healthy(stream_server.url)


def test_a_release_of_unknown_ids_is_ignored(stream_server: ServerProcess, kept: RawSession) -> None:
    assert release(stream_server.url, "bad", ["never", "produced"]) == 0
    assert release(stream_server.url, "no-such-run", ["s0"]) == 0
    assert release(stream_server.url, "bad", []) == 0
    assert runs(stream_server.url)["runs"]["bad"]["samples"] == 1
    resp = httpx.post(stream_server.url + "/stream/release", content=b"{not json", trust_env=False)
    assert 400 <= resp.status_code < 500
    resp = httpx.get(stream_server.url + "/stream/runs/b*d", trust_env=False)
    assert 400 <= resp.status_code < 500 and "the run id" in resp.json()["error"]
    assert healthy(stream_server.url)


# -- ResidentAnswers alone -------------------------------------------------------------------

RETRY = {"Retry-After": "1"}


def _answer(run_id: str, sample_id: str, size: int) -> KeptAnswer:
    tensors = {"target_probs": torch.zeros(size // 4, dtype=torch.float32)}
    ref = protocol.StreamRef(
        sample_id=sample_id,
        run_id=run_id,
        store_uri="appliance://127.0.0.1:1",
        feature_keys={"target_probs": "target_probs"},
        feature_specs={"target_probs": ((size // 4,), "float32")},
        algorithm="eagle3",
        schema_version=1,
        num_tokens=1,
        estimated_bytes=size,
        target_model_version="f",
    )
    return KeptAnswer(run_id, sample_id, tensors, {}, "eagle3", "probs", ref, size)


def _keep(resident: ResidentAnswers, run_id: str, sample_id: str, size: int) -> KeptAnswer:
    return resident.keep(resident.reserve(run_id, sample_id, size, RETRY), _answer(run_id, sample_id, size))


def _totals(resident: ResidentAnswers) -> tuple[int, int, int]:
    d = resident.describe()
    return d["resident_bytes"], d["reserved_bytes"], d["resident_samples"]


def test_reserve_keep_and_cancel_account_for_every_byte() -> None:
    resident = ResidentAnswers(1000, 500)
    first = resident.reserve("r", "a", 300, RETRY)
    assert _totals(resident) == (0, 300, 0)
    resident.keep(first, _answer("r", "a", 280))  # the real size, at most the estimate
    assert _totals(resident) == (280, 0, 1)
    resident.cancel(first)  # already kept: nothing more is given back
    assert _totals(resident) == (280, 0, 1)
    failed = resident.reserve("r", "b", 400, RETRY)
    assert _totals(resident) == (280, 400, 1)
    resident.cancel(failed)
    resident.cancel(failed)
    assert _totals(resident) == (280, 0, 1)
    assert resident.describe()["runs"] == {"r": {"samples": 1, "bytes": 280}}
    assert resident.get("r", "a").claims == 1 and resident.get("r", "a").claims == 2
    assert resident.peek("r", "b") is None and resident.peek("x", "a") is None


def test_refused_at_the_high_watermark_until_at_or_below_the_low_one() -> None:
    resident = ResidentAnswers(1000, 500)
    for i in range(4):
        _keep(resident, "r", f"s{i}", 200)
    with pytest.raises(StreamFull, match="high watermark") as info:
        resident.reserve("r", "s4", 201, RETRY)  # 800 + 201 > 1000
    assert info.value.status_code == 503
    assert info.value.headers == {**RETRY, protocol.STREAM_FULL_HEADER: "high"}
    assert resident.paused
    with pytest.raises(StreamFull):
        resident.reserve("r", "s4", 1, RETRY)  # room under high, but paused
    assert resident.release("r", ["s0"]) == 1  # 600: above low
    with pytest.raises(StreamFull):
        resident.reserve("r", "s4", 200, RETRY)
    assert resident.paused
    assert resident.release("r", ["s1"]) == 1  # 400: at or below low
    assert not resident.paused  # producers are admitted again, and describe() says so before one asks
    reservation = resident.reserve("r", "s4", 200, RETRY)
    assert not resident.paused
    resident.cancel(reservation)
    # Reservations count as held: two computations in flight cannot both take the last room.
    resident.reserve("r", "x", 300, RETRY)
    with pytest.raises(StreamFull):
        resident.reserve("r", "y", 301, RETRY)  # 400 + 300 + 301 > 1000


def test_a_run_that_ends_below_the_low_watermark_resumes_producers() -> None:
    resident = ResidentAnswers(1000, 500)
    _keep(resident, "r1", "a", 400)
    _keep(resident, "r2", "a", 500)
    with pytest.raises(StreamFull):
        resident.reserve("r2", "b", 200, RETRY)
    assert resident.paused and resident.describe()["paused"]
    assert resident.end_run("r2") == 1  # 400 left: at or below low
    assert not resident.paused and not resident.describe()["paused"]
    assert resident.end_run("r1") == 1
    assert not resident.paused


def test_a_failed_computation_that_frees_the_room_resumes_producers() -> None:
    resident = ResidentAnswers(1000, 500)
    _keep(resident, "r", "a", 300)
    computing = resident.reserve("r", "b", 600, RETRY)
    with pytest.raises(StreamFull):
        resident.reserve("r", "c", 200, RETRY)  # 300 + 600 + 200 > 1000
    assert resident.paused
    resident.cancel(computing)  # 300 held: at or below low
    assert not resident.paused


def test_a_claim_refused_by_its_check_is_not_counted() -> None:
    resident = ResidentAnswers(1000, 500)
    kept = _keep(resident, "r", "a", 100)

    def refuse(answer: KeptAnswer) -> None:
        assert answer is kept
        raise ValueError("not yours")

    with pytest.raises(ValueError, match="not yours"):
        resident.get("r", "a", refuse)
    assert kept.claims == 0
    assert resident.get("r", "a", lambda answer: None) is kept and kept.claims == 1


def test_an_exact_fit_is_admitted() -> None:
    resident = ResidentAnswers(1000, 0)
    _keep(resident, "r", "a", 600)
    _keep(resident, "r", "b", 400)
    assert _totals(resident) == (1000, 0, 2) and not resident.paused


def test_keeping_a_sample_twice_keeps_the_first_and_counts_it_once() -> None:
    resident = ResidentAnswers(1000, 500)
    first = _keep(resident, "r", "a", 200)
    late = resident.reserve("r", "a", 200, RETRY)  # a producer that raced on the same sample
    assert _totals(resident) == (200, 200, 1)
    assert resident.keep(late, _answer("r", "a", 200)) is first
    assert _totals(resident) == (200, 0, 1)
    assert resident.samples("r") == ["a"]


def test_end_run_drops_only_that_run() -> None:
    resident = ResidentAnswers(1000, 500)
    for sample in ("c", "a", "b"):
        _keep(resident, "r1", sample, 100)
    _keep(resident, "r2", "a", 50)
    assert resident.samples("r1") == ["c", "a", "b"]  # oldest first
    assert resident.end_run("r1") == 3
    assert resident.end_run("r1") == 0
    assert _totals(resident) == (50, 0, 1)
    assert resident.describe()["runs"] == {"r2": {"samples": 1, "bytes": 50}}
    with pytest.raises(NoKeptAnswer, match="run 'r1'") as info:
        resident.samples("r1")
    assert info.value.status_code == 404
    with pytest.raises(NoKeptAnswer, match="run 'r1'"):
        resident.get("r1", "a")
    with pytest.raises(NoKeptAnswer, match="sample 'zz'"):
        resident.get("r2", "zz")
    assert resident.release("r2", ["zz", "a", "a"]) == 1
    assert resident.describe()["runs"] == {} and _totals(resident) == (0, 0, 0)


def test_disabled_too_large_and_bad_watermarks() -> None:
    with pytest.raises(StreamFull, match="--stream-memory-mb 0") as info:
        ResidentAnswers(0, 0).reserve("r", "a", 1, RETRY)
    assert info.value.headers[protocol.STREAM_FULL_HEADER] == "disabled"
    resident = ResidentAnswers(1000, 500)
    with pytest.raises(StreamFull, match="larger than") as info:
        resident.reserve("r", "a", 1001, RETRY)
    assert info.value.headers[protocol.STREAM_FULL_HEADER] == "too-large"
    assert not resident.paused  # a batch that never fits does not pause the others
    _keep(resident, "r", "b", 1000)
    with pytest.raises(ValueError, match="low watermark"):
        ResidentAnswers(100, 101)


def test_priority_samples_use_the_reserve_that_new_samples_leave_free() -> None:
    """A sample computed again after its appliance was lost must find room even when every appliance
    is full of the samples queued behind it (the deadlock a trainer waiting for it would be in)."""
    resident = ResidentAnswers(1000, 500, reserve_bytes=100)
    assert resident.reserve_now == 100
    for i in range(3):
        _keep(resident, "r", f"s{i}", 200)  # 600; the reserve grew to two of the largest answers (400)
    assert resident.reserve_now == 400 and resident.low_bytes == 500
    with pytest.raises(StreamFull, match="high watermark"):
        resident.reserve("r", "new", 200, RETRY)
    assert resident.paused
    for i in range(2):  # into the reserve, despite the pause: two lost samples
        lost = resident.reserve("r", f"lost{i}", 200, RETRY, priority=True)
        resident.keep(lost, _answer("r", f"lost{i}", 200))
    assert _totals(resident) == (1000, 0, 5)
    with pytest.raises(StreamFull):  # the high watermark itself is never passed
        resident.reserve("r", "lost2", 1, RETRY, priority=True)
    big = ResidentAnswers(1000, 750, reserve_bytes=100)
    _keep(big, "r", "a", 300)  # the reserve becomes 500 (at most half): the low watermark follows it down
    assert big.reserve_now == 500 and big.low_bytes == 500
    with pytest.raises(ValueError, match="low watermark"):
        ResidentAnswers(1000, 950, reserve_bytes=100)
