"""A vision-language target on ``--tensor-parallel-size 2`` serves ViSpec, MSD and DSpark with vision inputs.

transformers shards the text stack of a Qwen2-VL (its text config's plan) and replicates the
vision tower; every rank runs the same call on the same vision tensors. As for every
tensor-parallel target the answers are within the documented tolerance of upstream's wrappers on
the whole model (docs/large-targets.md), not bit-identical. A request whose vision inputs the
model refuses is a 422 and leaves the ranks in step: the server stays ready and serves the next.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from eagle3_appliance.launch import ServerProcess
from eagle3_appliance.model.numerics import tolerance_for
from eagle3_client import RemoteDSparkTargetModel, RemoteMSDTargetModel, RemoteVispecTargetModel, TargetHTTPError
from tests.integration.automodel_support import import_or_skip
from tests.vlm_support import APPLIANCE_ARGS, IMAGE_TOKEN, vlm_batch

vispec = import_or_skip("nemo_automodel.components.speculative.eagle.vispec_target")
msd = import_or_skip("nemo_automodel.components.speculative.eagle.msd_target")
dspark = import_or_skip("nemo_automodel.components.speculative.dspark.target")

TOLERANCE = tolerance_for(torch.float32)


@pytest.fixture(scope="module")
def tp_server(vlm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("vlm-tp-logs") / "server.log"
    args = ["--model", str(vlm_dir), *APPLIANCE_ARGS, "--tensor-parallel-size", "2"]
    with ServerProcess(args, log_path=log, startup_timeout=300) as proc:
        yield proc


def assert_within(got: object, want: object) -> None:
    """Every tensor field: same dtype and shape; floating ones within ``aux_rel`` of their largest
    magnitude, the others (ids, masks) equal."""
    for name in want.__dataclass_fields__:  # type: ignore[attr-defined]
        a, b = getattr(got, name), getattr(want, name)
        if b is None:
            assert a is None, name
            continue
        assert a.dtype == b.dtype and a.shape == b.shape, name
        if not b.is_floating_point():
            assert torch.equal(a, b), name
            continue
        scale = float(b.abs().max()) or 1.0
        deviation = float((a - b).abs().max()) / scale
        assert deviation <= TOLERANCE.aux_rel, f"{name}: {deviation:.2g} of max"


def test_vispec_msd_and_dspark_with_vision_are_within_the_tolerance(
    tp_server: ServerProcess, vlm_model: torch.nn.Module
) -> None:
    ids, attention, loss, vision = vlm_batch(41, rows=3, length=16, images=2)
    with RemoteVispecTargetModel.from_urls([tp_server.url]) as remote:
        assert remote.served_model() is not None and remote.served_model().mode == "tp=2"
        want = vispec.HFVispecTargetModel(vlm_model, image_token_id=IMAGE_TOKEN).generate_batch(
            ids, attention, loss, **vision
        )
        assert_within(remote.generate_batch(ids, attention, loss, **vision), want)
    with RemoteMSDTargetModel.from_urls([tp_server.url]) as remote:
        inputs = {"input_ids": ids, "attention_mask": attention, **vision}
        want = msd.HFMSDTargetModel(vlm_model).generate_batch(loss_mask=loss.bool(), model_inputs=inputs)
        assert_within(remote.generate_batch(loss_mask=loss.bool(), model_inputs=inputs), want)
    layers = [-1, 1, 3]
    with RemoteDSparkTargetModel.from_urls([tp_server.url], target_layer_ids=layers) as remote:
        want = dspark.HFDSparkTargetModel(vlm_model, target_layer_ids=layers).generate_batch(
            ids, attention, loss, **vision
        )
        assert_within(remote.generate_batch(ids, attention, loss, **vision), want)


def test_inputs_the_model_refuses_are_a_422_and_the_ranks_stay_in_step(tp_server: ServerProcess) -> None:
    ids, attention, loss, vision = vlm_batch(43)
    types = vision["mm_token_type_ids"].clone()
    types[1, 10:14] = 1  # an image group in the text-only row, with no grid for it: the model's code fails
    with RemoteVispecTargetModel.from_urls([tp_server.url], max_retries=0) as remote:
        for _ in range(2):
            with pytest.raises(TargetHTTPError) as info:
                remote.generate_batch(ids, attention, loss, **{**vision, "mm_token_type_ids": types})
            assert info.value.status == 422, info.value
        assert httpx.get(tp_server.url + "/health/ready", trust_env=False).status_code == 200
        batch = remote.generate_batch(ids, attention, loss, **vision)
        assert batch.inputs_embeds.shape[:2] == ids.shape
