"""Our remote ViSpec and MSD targets are upstream's ``HFVispecTargetModel`` and ``HFMSDTargetModel``, bit for bit.

The reference is upstream's own wrapper run in this process on the same tiny Qwen2-VL checkpoint
(float32 on the CPU, as the appliance runs it), on batches with an image row and text-only rows,
without vision inputs at all, with bfloat16 pixels (what upstream's VLM collate sends), over the
wire and over gloo, synchronously and asynchronously;
and the embeddings and LM head the recipes read.
"""

from __future__ import annotations

import pytest
import torch

from eagle3_appliance.launch import ServerProcess
from eagle3_client import RemoteMSDTargetModel, RemoteVispecTargetModel
from tests.integration.automodel_support import import_or_skip
from tests.vlm_support import IMAGE_TOKEN, vlm_batch

vispec = import_or_skip("nemo_automodel.components.speculative.eagle.vispec_target")
msd = import_or_skip("nemo_automodel.components.speculative.eagle.msd_target")

BATCHES = [(11, 2, 16, 1), (12, 3, 12, 2), (13, 2, 10, 0), (14, 1, 9, 1)]  # seed, rows, length, image rows


def assert_same(got: object, want: object, batch_type: type) -> None:
    assert type(got) is type(want) is batch_type
    for field in batch_type.__dataclass_fields__:
        a, b = getattr(got, field), getattr(want, field)
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), field


@pytest.mark.parametrize("data_plane", ["wire", "gloo"])
def test_vispec_is_bit_identical_to_upstream(
    vlm_server: ServerProcess, vlm_model: torch.nn.Module, data_plane: str
) -> None:
    reference = vispec.HFVispecTargetModel(vlm_model, image_token_id=IMAGE_TOKEN)
    with RemoteVispecTargetModel.from_urls([vlm_server.url], data_plane=data_plane) as remote:
        assert remote.image_token_id == IMAGE_TOKEN
        for seed, rows, length, images in BATCHES:
            ids, attention, loss, vision = vlm_batch(seed, rows=rows, length=length, images=images)
            want = reference.generate_batch(ids, attention, loss, **vision)
            assert_same(remote.generate_batch(ids, attention, loss, **vision), want, vispec.VispecTargetBatch)
            if images:
                assert bool(want.image_mask.any())
        # Upstream's VLM collate sends bfloat16 pixels whatever the target's dtype: served as sent.
        ids, attention, loss, vision = vlm_batch(16)
        vision["pixel_values"] = vision["pixel_values"].to(torch.bfloat16)
        want = reference.generate_batch(ids, attention, loss, **vision)
        assert_same(remote.generate_batch(ids, attention, loss, **vision), want, vispec.VispecTargetBatch)
        ids, attention, loss, vision = vlm_batch(15)
        handle = remote.generate_batch_async(ids, attention, loss, **vision)
        assert_same(
            handle.result(60), reference.generate_batch(ids, attention, loss, **vision), vispec.VispecTargetBatch
        )
        assert remote.transport_stats()[0]["tier"] == data_plane


@pytest.mark.parametrize("data_plane", ["wire", "gloo"])
def test_msd_is_bit_identical_to_upstream(
    vlm_server: ServerProcess, vlm_model: torch.nn.Module, data_plane: str
) -> None:
    reference = msd.HFMSDTargetModel(vlm_model)
    with RemoteMSDTargetModel.from_urls([vlm_server.url], data_plane=data_plane) as remote:
        for seed, rows, length, images in BATCHES:
            ids, attention, loss, vision = vlm_batch(seed, rows=rows, length=length, images=images)
            inputs = {"input_ids": ids, "attention_mask": attention, **vision}
            want = reference.generate_batch(loss_mask=loss.bool(), model_inputs=inputs)
            assert_same(remote.generate_batch(loss_mask=loss.bool(), model_inputs=inputs), want, msd.MSDTargetBatch)
        assert remote.transport_stats()[0]["tier"] == data_plane


def test_the_embeddings_and_lm_head_are_the_targets(vlm_server: ServerProcess, vlm_model: torch.nn.Module) -> None:
    reference = vispec.HFVispecTargetModel(vlm_model, image_token_id=IMAGE_TOKEN)
    with RemoteVispecTargetModel.from_urls([vlm_server.url]) as remote:
        assert torch.equal(remote.get_input_embeddings().weight, reference.get_input_embeddings().weight)
        assert torch.equal(remote.get_lm_head().weight, reference.get_lm_head().weight)
    with RemoteMSDTargetModel.from_urls([vlm_server.url]) as remote:
        assert torch.equal(remote.get_lm_head().weight, msd.HFMSDTargetModel(vlm_model).get_lm_head().weight)
