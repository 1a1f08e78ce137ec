"""The DSpark recipe trains from the stream: ``target_model_backend: stream``.

As ``test_stream_dflash_recipe.py`` for the DFlash family: the producer runs in recipe mode
(``eagle3-appliance produce -c dspark.yaml --capture dspark:...``), the trainer is our launcher
with the stream backend, and the reference is upstream's recipe ``main`` with its co-located
target from the same YAML, its train loader sampling as a stream trainer's does. The recipe's
FlexAttention has no backward on the CPU, so each run computes the recipe's own losses for its
first batches without gradients (``dspark_recipe_runner.py``); the run holds exactly those
batches, so the trainer acks every sample and the producer's run closes. Target batches and
losses are equal batch for batch and the draft's weights bit for bit, padded and packed.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from eagle3_appliance.launch import ServerProcess
from tests.integration.automodel_support import import_or_skip, make_qwen3_recipe_target
from tests.integration.test_dspark_recipe import RECIPE_YAML
from tests.integration.test_stream_dflash_recipe import _finish, _start

import_or_skip("nemo_automodel.recipes.llm.train_dspark")

RUNNER = Path(__file__).with_name("dspark_recipe_runner.py")
MICRO_BATCH = 2
STREAM_KEYS = """\
  stream_queue: {queue}
  stream_run_id: {run_id}
  train_shuffle: {shuffle}
"""


@pytest.fixture(scope="module")
def qwen3_target(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.integration.dspark_recipe_runner import BATCHES  # imports AutoModel: after the skip above

    # Exactly the batches the runner computes: the trainer consumes (and acks) the whole run.
    return make_qwen3_recipe_target(tmp_path_factory.mktemp("qwen3-dspark-stream"), samples=BATCHES * MICRO_BATCH)


@pytest.fixture(scope="module")
def appliance(qwen3_target: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("stream-dspark-logs") / "qwen3.log"
    with ServerProcess(["--model", str(qwen3_target), "--device", "cpu"], log_path=log) as proc:
        yield proc


@pytest.mark.parametrize(
    ("packed", "layers", "shuffle"), [(0, "[-1, 3, 7]", "true"), (96, "[-1, 2, 7]", "false")], ids=["padded", "packed"]
)
def test_the_dspark_recipe_trains_from_the_stream_as_colocated(
    appliance: ServerProcess, qwen3_target: Path, tmp_path: Path, packed: int, layers: str, shuffle: str
) -> None:
    run_id = f"dspark-{packed}"
    queue = "appliance://" + appliance.url.removeprefix("http://")
    text = RECIPE_YAML.format(
        recipe="TrainDSparkRecipe", target=qwen3_target, url=appliance.url, out=tmp_path / "out", packed=packed,
        layers=layers,
    ).replace("target_model_backend: remote", "target_model_backend: stream")  # fmt: skip
    text = text.replace(
        "recipe_args:\n", "recipe_args:\n" + STREAM_KEYS.format(queue=queue, run_id=run_id, shuffle=shuffle)
    )
    yaml_path = tmp_path / "dspark.yaml"
    yaml_path.write_text(text)
    capture = "dspark:" + ",".join(str(i) for i in eval(layers))  # noqa: S307 - our own literal
    logs = {name: tmp_path / f"{name}.log" for name in ("producer", "stream", "colocated")}
    producer = _start(
        ["-m", "eagle3_appliance", "produce", "--urls", appliance.url, "--queue", queue, "--run-id", run_id,
         "-c", str(yaml_path), "--capture", capture, "--timeout", "380"],
        logs["producer"],
    )  # fmt: skip
    stream = _start([str(RUNNER), "remote", str(tmp_path / "stream.pt"), "-c", str(yaml_path)], logs["stream"])
    colocated = _start(
        [str(RUNNER), "colocated-sampled", str(tmp_path / "colocated.pt"), "-c", str(yaml_path),
         "--recipe_args.target_model_backend=colocated"],
        logs["colocated"],
    )  # fmt: skip
    stream_out = _finish(stream, logs["stream"])
    _finish(colocated, logs["colocated"])
    produced = _finish(producer, logs["producer"])
    assert "in 1 run(s) closed" in produced  # every sample acked
    assert stream_out.count("from the stream: run") == 1 and f"({capture})" in stream_out
    from tests.integration import dspark_recipe_runner as runner  # imports AutoModel: after the skip above

    s, c = torch.load(tmp_path / "stream.pt"), torch.load(tmp_path / "colocated.pt")
    assert s["backend"] == "eagle3_client.automodel_stream_dflash.StreamDSparkTarget"
    assert s["target_model"] == "ConfigOnlyTarget" and c["target_model"] == "Qwen3ForCausalLM"
    assert 1 <= len(c["losses"]) <= runner.BATCHES and bool(torch.isfinite(c["losses"]).all())  # packed: fewer rows
    assert torch.equal(s["losses"], c["losses"]), f"stream {s['losses'].tolist()} != co-located {c['losses'].tolist()}"
    assert all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(s["hidden"], c["hidden"], strict=True))
    assert s["documents"] == c["documents"] and (max(c["documents"]) > 1) == bool(packed)
    assert [k for k in c["final"] if not torch.equal(s["final"][k], c["final"][k])] == []
