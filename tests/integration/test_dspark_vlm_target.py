"""DSpark on a vision-language target (upstream's ``multimodal: true``) is upstream's ``HFDSparkTargetModel``, bit for bit.

The reference is upstream's own wrapper run in this process on the tiny Qwen2-VL checkpoint of
``tests/vlm_support.py`` (float32 on the CPU, as the appliance runs it), given the same vision
tensors as ``**mm_kwargs``: batches with an image row and text-only rows, without vision inputs
at all, with bfloat16 pixels, synchronously and asynchronously. Undeclared vision keys are a 422
naming them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from eagle3_appliance.launch import ServerProcess
from eagle3_client import RemoteDSparkTargetModel, TargetHTTPError
from tests.integration.automodel_support import import_or_skip
from tests.vlm_support import APPLIANCE_ARGS, split_device_map, vlm_batch

upstream = import_or_skip("nemo_automodel.components.speculative.dspark.target")

BATCHES = [(21, 2, 16, 1), (22, 3, 12, 2), (23, 2, 10, 0), (24, 1, 9, 1)]  # seed, rows, length, image rows
LAYER_SETS = [[-1, 1, 3], [0, 2]]  # 4 decoder layers: -1 the embedding output, 3 the post-norm state
FIELDS = ("target_hidden_states", "target_last_hidden_states", "input_ids", "loss_mask")


def assert_same(got: object, want: object) -> None:
    assert type(got) is type(want) is upstream.DSparkTargetBatch
    for field in FIELDS:
        a, b = getattr(got, field), getattr(want, field)
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), field
    for field in ("position_ids", "seq_lens", "doc_remaining"):
        assert getattr(got, field) is None and getattr(want, field) is None, field


def test_upstream_finds_the_text_stack_of_a_qwen2_vl(vlm_model: torch.nn.Module) -> None:
    reference = upstream.HFDSparkTargetModel(vlm_model, target_layer_ids=[-1, 3])
    assert reference._get_final_norm() is vlm_model.model.language_model.norm
    assert len(reference._get_transformer_layers()) == 4


@pytest.mark.parametrize("layers", LAYER_SETS, ids=str)
def test_bit_identical_to_upstream_with_vision_inputs(
    vlm_server: ServerProcess, vlm_model: torch.nn.Module, layers: list[int]
) -> None:
    reference = upstream.HFDSparkTargetModel(vlm_model, target_layer_ids=layers)
    with RemoteDSparkTargetModel.from_urls([vlm_server.url], target_layer_ids=layers) as remote:
        for seed, rows, length, images in BATCHES:
            ids, attention, loss, vision = vlm_batch(seed, rows=rows, length=length, images=images)
            want = reference.generate_batch(ids, attention, loss, **vision)
            assert_same(remote.generate_batch(ids, attention, loss, **vision), want)
            if images:  # the image changes the features (the check above is not vacuous)
                text_only = reference.generate_batch(ids, attention, loss)
                assert not torch.equal(want.target_hidden_states[0], text_only.target_hidden_states[0])
        # Upstream's VLM collate sends bfloat16 pixels whatever the target's dtype: served as sent.
        ids, attention, loss, vision = vlm_batch(25)
        vision["pixel_values"] = vision["pixel_values"].to(torch.bfloat16)
        assert_same(
            remote.generate_batch(ids, attention, loss, **vision),
            reference.generate_batch(ids, attention, loss, **vision),
        )
        ids, attention, loss, vision = vlm_batch(26, rows=3, images=2)
        handle = remote.generate_batch_async(ids, attention, loss, **vision)
        assert_same(handle.result(60), reference.generate_batch(ids, attention, loss, **vision))


def test_undeclared_vision_keys_are_a_422_naming_them(vlm_server: ServerProcess) -> None:
    ids, attention, loss, vision = vlm_batch(27)
    extra = {"pixel_mask": torch.ones(1, 4, dtype=torch.int64), "labels": torch.zeros(2, 16).long()}
    with RemoteDSparkTargetModel.from_urls([vlm_server.url], target_layer_ids=[-1, 3], max_retries=0) as remote:
        with pytest.raises(TargetHTTPError, match=r"vision inputs \['labels', 'pixel_mask'\] are not inputs") as info:
            remote.generate_batch(ids, attention, loss, **vision, **extra)
        assert info.value.status == 422
        with pytest.raises(TargetHTTPError, match=r"image_grid_thw has dtype float32"):
            remote.generate_batch(
                ids, attention, loss, **{**vision, "image_grid_thw": vision["image_grid_thw"].float()}
            )


def test_vision_inputs_the_model_rejects_are_a_422_and_the_server_goes_on(vlm_server: ServerProcess) -> None:
    """Token types naming a second image the request has no grid for (the model's own code fails
    on it; the server's checks cannot see it): the request's fault, a 422 with the model's
    message, not a 500; the next request is served. (Placeholders that disagree with the pixel
    rows are refused before the forward: tests/test_vlm_capture.py.)"""
    ids, attention, loss, vision = vlm_batch(29)
    types = vision["mm_token_type_ids"].clone()
    types[1, 10:14] = 1  # an image group in the text-only row
    with RemoteDSparkTargetModel.from_urls([vlm_server.url], target_layer_ids=[-1, 3], max_retries=0) as remote:
        with pytest.raises(TargetHTTPError) as info:
            remote.generate_batch(ids, attention, loss, **{**vision, "mm_token_type_ids": types})
        assert info.value.status == 422, info.value
        assert "refused this request" in str(info.value)
        batch = remote.generate_batch(ids, attention, loss, **vision)
        assert batch.target_hidden_states.shape[:2] == ids.shape


def test_a_device_map_serves_dspark_with_vision_bit_identical(
    vlm_dir: Path, vlm_model: torch.nn.Module, tmp_path: Path
) -> None:
    """The features are read by hooks on modules accelerate moves and reads back from disk."""
    args = ["--model", str(vlm_dir), *APPLIANCE_ARGS, "--device-map", split_device_map(), "--cache-dir", str(tmp_path)]
    layers = [-1, 1, 3]
    reference = upstream.HFDSparkTargetModel(vlm_model, target_layer_ids=layers)
    with ServerProcess(args, log_path=tmp_path / "server.log") as server:
        with RemoteDSparkTargetModel.from_urls([server.url], target_layer_ids=layers) as remote:
            for seed, rows, length, images in BATCHES[:3]:
                ids, attention, loss, vision = vlm_batch(seed, rows=rows, length=length, images=images)
                assert_same(
                    remote.generate_batch(ids, attention, loss, **vision),
                    reference.generate_batch(ids, attention, loss, **vision),
                )
