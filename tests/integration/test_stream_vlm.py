"""ViSpec and MSD on the stream: computed ahead on an appliance, read through our loaders, upstream's batches.

One appliance on the tiny Qwen2-VL of ``tests/vlm_support.py``, started as a user would (no family
flags). A run mixes image rows, text-only rows, a sample with no vision tensors at all and one with
bfloat16 pixels (what upstream's VLM collate sends); each batch a loader yields is compared field by
field (dtype, shape, values) with upstream's ``HFVispecTargetModel`` / ``HFMSDTargetModel`` run in this
process on the same checkpoint, on the appliance's queue and on a real ``redis-server``.
"""

from __future__ import annotations

import time
from typing import Any, cast

import httpx
import pytest
import torch

from eagle3_appliance.core.inputs import GenerateInputs
from eagle3_appliance.launch import ServerProcess
from eagle3_appliance.model.limits import TargetShape
from eagle3_appliance.serving.stream_answers import estimate_bytes
from eagle3_client import protocol
from eagle3_client.capture import VLM_KEYS, Capture
from eagle3_client.encodings import PROBS
from eagle3_client.streaming.producer import Producer, sample_id, vision_inputs
from eagle3_client.streaming.queues import RunMismatch
from tests.integration.automodel_support import import_or_skip
from tests.integration.test_stream import new_run, produce_in_thread, record_leases
from tests.integration.test_vlm_target import assert_same
from tests.vlm_support import IMAGE_TOKEN, VOCAB, vlm_batch

vispec = import_or_skip("nemo_automodel.components.speculative.eagle.vispec_target")
msd = import_or_skip("nemo_automodel.components.speculative.eagle.msd_target")
open_stream = import_or_skip("eagle3_client.streaming.open").open_stream  # the consumer side needs AutoModel
loaders = import_or_skip("eagle3_client.streaming.loader")
store_module = import_or_skip("eagle3_client.streaming.store")

# seed, rows, length, image rows: image rows beside text-only ones, none at all (no vision tensors),
# and a last sample whose pixels are sent in bfloat16.
SAMPLES = [(41, 2, 16, 1), (42, 3, 12, 2), (43, 2, 10, 0), (44, 1, 9, 1), (45, 2, 14, 1)]
HIDDEN = 64  # the tiny Qwen2-VL's hidden size (float32 on the CPU)
KINDS = {
    "vispec": (Capture.vispec(), "ViSpec", "VispecFeatureLoader"),
    "msd": (Capture.msd(), "MSD", "MSDFeatureLoader"),
}


@pytest.fixture(params=["appliance", "redis"])
def queue_url(request: pytest.FixtureRequest, vlm_server: ServerProcess) -> str:
    if request.param == "redis":
        return str(request.getfixturevalue("redis_url"))
    return "appliance://" + vlm_server.url.removeprefix("http://")


def samples() -> list[dict[str, torch.Tensor]]:
    """The run's batches: each a Batch mapping whose keys beyond the request's are its vision tensors."""
    out = []
    for seed, rows, length, images in SAMPLES:
        ids, attention, loss, vision = vlm_batch(seed, rows=rows, length=length, images=images)
        out.append({"input_ids": ids, "attention_mask": attention, "loss_mask": loss, **cast(dict, vision)})
    out[-1]["pixel_values"] = out[-1]["pixel_values"].to(torch.bfloat16)
    return out


def upstream_batch(kind: str, model: torch.nn.Module, sample: dict[str, torch.Tensor]) -> Any:
    """Upstream's wrapper, co-located in this process, on the sample's tensors."""
    ids, attention, loss = sample["input_ids"], sample["attention_mask"], sample["loss_mask"]
    vision = vision_inputs(sample)
    if kind == "vispec":
        return vispec.HFVispecTargetModel(model, image_token_id=IMAGE_TOKEN).generate_batch(
            ids, attention, loss, **vision
        )
    inputs = {"input_ids": ids, "attention_mask": attention, **vision}
    return msd.HFMSDTargetModel(model).generate_batch(loss_mask=loss.bool(), model_inputs=inputs)


def batch_type(kind: str) -> type:
    found: type = vispec.VispecTargetBatch if kind == "vispec" else msd.MSDTargetBatch
    return found


def kept_bytes(sample: dict[str, torch.Tensor]) -> int:
    """What the appliance keeps of a sample: the answer (embeddings, last hidden state ``[B,T,H]``,
    logits ``[B,T,V]``, float32) and the request's ids and masks; never its vision tensors."""
    requested = sum(sample[k].numel() * sample[k].element_size() for k in protocol.GENERATE_INPUT_KEYS)
    return sample["input_ids"].numel() * (2 * HIDDEN + VOCAB) * 4 + requested


def wait_for(predicate: Any, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_vlm_capture_streams_through_our_loader(
    vlm_server: ServerProcess, vlm_model: torch.nn.Module, queue_url: str, kind: str
) -> None:
    """Every sample produced ahead, consumed once, and each batch upstream's wrapper's bit for bit."""
    capture, _, loader_name = KINDS[kind]
    batches = samples()
    run_id = new_run(kind)
    with Producer([vlm_server.url], queue_url, run_id, batches, capture=capture) as producer:
        thread, result = produce_in_thread(producer)
        queue, store = open_stream(queue_url, run_id=run_id, wait_for_run=30)
        described = store.description
        assert (described.algorithm, described.capture, described.image_token_id) == (kind, kind, IMAGE_TOKEN)
        # Before any trainer reads: every answer is kept, at the size reserved for it before its forward.
        wait_for(lambda: queue.backend.state().known == len(batches), "every sample on the queue")
        resident = httpx.get(f"{vlm_server.url}/stream/runs", trust_env=False).json()["runs"][run_id]
        assert resident == {"samples": len(batches), "bytes": sum(kept_bytes(b) for b in batches)}
        shape = TargetShape(
            max_position_embeddings=512,
            vocab_size=VOCAB,
            hidden_size=HIDDEN,
            intermediate_size=128,
            dtype_bytes=4,
            num_layers=4,
        )
        for b in batches:
            inputs = GenerateInputs(b["input_ids"], b["attention_mask"], b["loss_mask"], None, vision_inputs(b))
            assert estimate_bytes(shape, capture, PROBS, None, inputs) == kept_bytes(b)
        seen = record_leases(queue)
        got = list(getattr(loaders, loader_name)(queue, store))
        thread.join(60)
        store.close()
    assert "error" not in result, result
    assert sorted(seen) == [sample_id(0, i) for i in range(len(batches))]  # each sample exactly once
    for sid, batch in zip(seen, got, strict=True):
        source = batches[int(sid.rsplit("-b", 1)[1])]
        want = upstream_batch(kind, vlm_model, source)
        assert_same(batch, want, batch_type(kind))
        assert bool(want.image_mask.any()) == ("pixel_values" in source)
    state = queue.backend.state()
    assert state.closed and state.acked == len(batches) and state.redelivered == 0
    assert run_id not in httpx.get(f"{vlm_server.url}/stream/runs", trust_env=False).json()["runs"]


def test_the_producer_refuses_vision_tensors_a_stream_cannot_carry(vlm_server: ServerProcess) -> None:
    queue_url = "appliance://" + vlm_server.url.removeprefix("http://")
    sample = samples()[0]
    packed = {**sample, **{k: torch.zeros_like(sample["input_ids"]) for k in protocol.PACKING_KEYS}}
    with pytest.raises(
        ValueError,
        match=r"carries vision tensors \['image_grid_thw', 'mm_token_type_ids', 'pixel_values'\] and packing keys",
    ):
        Producer([vlm_server.url], queue_url, new_run("packed"), [packed], capture=Capture.vispec())
    with pytest.raises(ValueError, match="a stream carries them for ViSpec, MSD and DSpark runs only, not dflash"):
        Producer([vlm_server.url], queue_url, new_run("dflash"), [sample], capture=Capture.dflash([1, 3]))


def test_dspark_with_vision_inputs_streams_through_its_loader(
    vlm_server: ServerProcess, vlm_model: torch.nn.Module, queue_url: str
) -> None:
    """DSpark on a vision-language target (upstream's ``multimodal: true``): each sample's vision
    tensors go to the appliance with it, and every batch is ``HFDSparkTargetModel``'s bit for bit."""
    dspark = import_or_skip("nemo_automodel.components.speculative.dspark.target")
    layers = [-1, 1, 3]
    batches = samples()
    run_id = new_run("dspark-vlm")
    with Producer([vlm_server.url], queue_url, run_id, batches, capture=Capture.dspark(layers)) as producer:
        thread, result = produce_in_thread(producer)
        queue, store = open_stream(queue_url, run_id=run_id, wait_for_run=30)
        seen = record_leases(queue)
        got = list(loaders.DSparkFeatureLoader(queue, store))
        thread.join(60)
        store.close()
    assert "error" not in result, result
    assert sorted(seen) == [sample_id(0, i) for i in range(len(batches))]
    reference = dspark.HFDSparkTargetModel(vlm_model, target_layer_ids=layers)
    for sid, batch in zip(seen, got, strict=True):
        source = batches[int(sid.rsplit("-b", 1)[1])]
        ids, attention, loss = source["input_ids"], source["attention_mask"], source["loss_mask"]
        want = reference.generate_batch(ids, attention, loss, **vision_inputs(source))
        assert type(batch) is type(want)
        for name in want.__dataclass_fields__:
            a, b = getattr(batch, name), getattr(want, name)
            assert (a is None and b is None) or (a.dtype == b.dtype and torch.equal(a, b)), name


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_vlm_run_is_read_by_its_own_loader_only(vlm_server: ServerProcess, kind: str) -> None:
    capture, name, loader_name = KINDS[kind]
    other = "msd" if kind == "vispec" else "vispec"
    queue_url = "appliance://" + vlm_server.url.removeprefix("http://")
    batches = samples()[:3]
    run_id = new_run(f"{kind}-refused")
    with Producer([vlm_server.url], queue_url, run_id, batches, capture=capture) as producer:
        thread, result = produce_in_thread(producer)
        queue, store = open_stream(queue_url, run_id=run_id, wait_for_run=30)
        for wrong in ("DFlashFeatureLoader", "DSparkFeatureLoader", KINDS[other][2]):
            with pytest.raises(ValueError, match=f"this run streams {name} batches: use {loader_name}"):
                getattr(loaders, wrong)(queue, store)
        lease = None
        while lease is None:
            lease = queue.acquire()
            time.sleep(0.05)
        ref = lease.ref
        assert ref.algorithm == kind
        assert set(ref.feature_keys) == {*VLM_KEYS, *protocol.GENERATE_INPUT_KEYS}
        # A store of the other VLM capture: the reference says which, refused before any claim.
        other_run = protocol.RunDescription(**{**store.description.to_json(), "algorithm": other, "capture": other})
        other_store = store_module.ApplianceFeatureStore(queue.backend, other_run)
        with pytest.raises(RunMismatch, match=f"is a {kind} sample; this store reads {other} answers"):
            other_store.get(ref)
        other_store.close()
        # A DFlash run is not read by a VLM loader; a run that names no image token id is not read at all.
        dflash_run = protocol.RunDescription(
            **{**store.description.to_json(), "algorithm": "dflash", "capture": "dflash:0,3", "image_token_id": None}
        )
        dflash_store = store_module.ApplianceFeatureStore(queue.backend, dflash_run)
        with pytest.raises(ValueError, match="this run streams dflash batches: use DFlashFeatureLoader"):
            getattr(loaders, loader_name)(queue, dflash_store)
        dflash_store.close()
        unnamed = protocol.RunDescription(**{**store.description.to_json(), "image_token_id": None})
        unnamed_store = store_module.ApplianceFeatureStore(queue.backend, unnamed)
        with pytest.raises(ValueError, match=f"run {run_id!r} names no image token id"):
            getattr(loaders, loader_name)(queue, unnamed_store)
        unnamed_store.close()
        # The run's own store: the reference describes the tensors it returns, exactly.
        tensors, _ = store.get(ref)
        specs = {k: (tuple(t.shape), t.dtype) for k, t in tensors.items()}
        assert specs == {k: (spec.shape, spec.dtype) for k, spec in ref.feature_specs.items()}
        assert ref.estimated_bytes == sum(t.numel() * t.element_size() for t in tensors.values())
        queue.ack(lease)
        rest = list(getattr(loaders, loader_name)(queue, store))
        thread.join(60)
        store.close()
    assert "error" not in result, result
    assert len(rest) == len(batches) - 1
    assert all(type(batch) is batch_type(kind) for batch in rest)
