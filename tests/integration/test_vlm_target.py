"""Our remote ViSpec and MSD targets are upstream's ``HFVispecTargetModel`` and ``HFMSDTargetModel``, bit for bit.

The reference is upstream's own wrapper run in this process on the same tiny Qwen2-VL checkpoint
(float32 on the CPU, as the appliance runs it), on batches with an image row and text-only rows,
without vision inputs at all, with bfloat16 pixels (what upstream's VLM collate sends), over the
wire and over gloo, synchronously and asynchronously;
and the embeddings and LM head the recipes read.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from eagle3_appliance.launch import ServerProcess
from eagle3_client import RemoteMSDTargetModel, RemoteVispecTargetModel
from tests.integration.automodel_support import import_or_skip
from tests.vlm_support import (
    APPLIANCE_ARGS,
    IMAGE_TOKEN,
    VIDEO_TOKEN,
    VISION_END,
    VISION_START,
    split_device_map,
    vlm_batch,
)

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


def test_a_device_map_serves_both_captures_bit_identical(
    vlm_dir: Path, vlm_model: torch.nn.Module, tmp_path: Path
) -> None:
    """A VLM placed with ``--device-map`` (half of it read back from disk by accelerate's hooks)
    answers ViSpec and MSD exactly as upstream's wrappers do on the model in one piece."""
    args = ["--model", str(vlm_dir), *APPLIANCE_ARGS, "--device-map", split_device_map(), "--cache-dir", str(tmp_path)]
    vispec_ref = vispec.HFVispecTargetModel(vlm_model, image_token_id=IMAGE_TOKEN)
    msd_ref = msd.HFMSDTargetModel(vlm_model)
    with ServerProcess(args, log_path=tmp_path / "server.log") as server:
        with RemoteVispecTargetModel.from_urls([server.url]) as remote:
            assert remote.served_model() is not None and remote.served_model().mode == "device_map"
            for seed, rows, length, images in BATCHES[:2]:
                ids, attention, loss, vision = vlm_batch(seed, rows=rows, length=length, images=images)
                want = vispec_ref.generate_batch(ids, attention, loss, **vision)
                assert_same(remote.generate_batch(ids, attention, loss, **vision), want, vispec.VispecTargetBatch)
        with RemoteMSDTargetModel.from_urls([server.url]) as remote:
            ids, attention, loss, vision = vlm_batch(31)
            inputs = {"input_ids": ids, "attention_mask": attention, **vision}
            want = msd_ref.generate_batch(loss_mask=loss.bool(), model_inputs=inputs)
            assert_same(remote.generate_batch(loss_mask=loss.bool(), model_inputs=inputs), want, msd.MSDTargetBatch)
    assert "placement device_map" in (tmp_path / "server.log").read_text()


def test_a_video_row_is_bit_identical(vlm_server: ServerProcess, vlm_model: torch.nn.Module) -> None:
    """Video inputs (``pixel_values_videos``, ``video_grid_thw``, token type 2) next to an image row."""
    ids, attention, loss, vision = vlm_batch(33, rows=2, length=24)
    ids[1, 2:12] = torch.tensor([VISION_START, *[VIDEO_TOKEN] * 8, VISION_END])  # 2 frames of 2x2 merged patches
    gen = torch.Generator().manual_seed(34)
    vision |= {
        "pixel_values_videos": torch.randn(32, vision["pixel_values"].shape[1], generator=gen),
        "video_grid_thw": torch.tensor([[2, 4, 4]]),
        "mm_token_type_ids": (ids == IMAGE_TOKEN).long() + 2 * (ids == VIDEO_TOKEN).long(),
    }
    reference = vispec.HFVispecTargetModel(vlm_model, image_token_id=IMAGE_TOKEN)
    with RemoteVispecTargetModel.from_urls([vlm_server.url]) as remote:
        want = reference.generate_batch(ids, attention, loss, **vision)
        assert_same(remote.generate_batch(ids, attention, loss, **vision), want, vispec.VispecTargetBatch)
    without = {k: v for k, v in vision.items() if "video" not in k}
    without["mm_token_type_ids"] = (ids == IMAGE_TOKEN).long()
    other = reference.generate_batch(ids, attention, loss, **without)
    assert not torch.equal(want.input_hidden_states, other.input_hidden_states)  # the video is not ignored


def test_a_fleet_of_two_serves_both_captures_bit_identical(
    vlm_server: ServerProcess, vlm_dir: Path, vlm_model: torch.nn.Module, tmp_path: Path
) -> None:
    """Two appliances on one checkpoint: requests in flight on both at once (the fleet spreads
    them), each answer upstream's; both name the same image token id."""
    vispec_ref = vispec.HFVispecTargetModel(vlm_model, image_token_id=IMAGE_TOKEN)
    msd_ref = msd.HFMSDTargetModel(vlm_model)
    with ServerProcess(["--model", str(vlm_dir), *APPLIANCE_ARGS], log_path=tmp_path / "second.log") as second:
        urls = [vlm_server.url, second.url]
        with RemoteVispecTargetModel.from_urls(urls) as remote:
            batches = [
                vlm_batch(seed, rows=rows, length=length, images=images) for seed, rows, length, images in BATCHES
            ]
            handles = [remote.generate_batch_async(ids, att, loss, **vision) for ids, att, loss, vision in batches]
            for (ids, att, loss, vision), handle in zip(batches, handles, strict=True):
                want = vispec_ref.generate_batch(ids, att, loss, **vision)
                assert_same(handle.result(120), want, vispec.VispecTargetBatch)
            served = {stats["url"] for stats in remote.transport_stats() if stats["served"]}
            assert len(served) == 2, remote.transport_stats()
        with RemoteMSDTargetModel.from_urls(urls) as remote:
            for ids, att, loss, vision in batches[:2]:
                inputs = {"input_ids": ids, "attention_mask": att, **vision}
                want = msd_ref.generate_batch(loss_mask=loss.bool(), model_inputs=inputs)
                assert_same(remote.generate_batch(loss_mask=loss.bool(), model_inputs=inputs), want, msd.MSDTargetBatch)
