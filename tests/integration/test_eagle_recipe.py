"""EAGLE-1/2 and ViSpec's stage 1 train against an appliance exactly as against their co-located target.

Real runs of NeMo AutoModel's ``TrainEagle1Recipe`` (on the built-in model, with and without
packed rows), ``TrainEagle2Recipe`` and ``TrainVispecStage1Recipe`` (on the tiny Qwen2.5-VL of
``tests/vlm_support.py``, with a text-only data set, as stage 1 trains) on the CPU, each in its own
process, from one YAML: our launcher (``python -m eagle3_client.automodel_launch``'s code) with
``target_model_backend: remote`` against a real appliance, and the recipe module's own ``main``,
which loads the target itself. Upstream's training loop runs unchanged: the target batches, the
loss of every step and the draft's weights after training must be equal bit for bit, and the
remote run must have loaded no target weights. See ``eagle_recipe_runner.py`` for the instruments.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from eagle3_appliance.launch import ServerProcess
from tests.integration.automodel_support import PYTHON, import_or_skip, make_recipe_target, python_env
from tests.vlm_support import APPLIANCE_ARGS, make_vispec_recipe_target

import_or_skip("nemo_automodel.recipes.llm.train_eagle1")
import_or_skip("nemo_automodel.recipes.llm.train_vispec")

RUNNER = Path(__file__).with_name("eagle_recipe_runner.py")

RECIPE_YAML = """\
recipe: {recipe}
dist_env:
  backend: gloo
recipe_args:
  target_model_name_or_path: {target}
  target_model_backend: {backend}
  remote_urls: ["{url}"]
  remote_timeout: 60
  train_data_path: {data}
  output_dir: {out}
  seq_length: 40
  micro_batch_size: {micro_batch_size}
  num_epochs: 1
  draft_num_hidden_layers: 1
  log_every_steps: 1
  shuffle_seed: 42
  packed_sequence_size: {packed}
optimizer:
  lr: 1.0e-3
checkpoint:
  enabled: false
"""


@pytest.fixture(scope="module")
def eagle_target(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_recipe_target(model_dir, tmp_path_factory.mktemp("eagle") / "target", samples=8)


@pytest.fixture(scope="module")
def stage1_target(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ViSpec recipe's Qwen2.5-VL folder, with text-only conversations for stage 1 (no images)."""
    target = make_vispec_recipe_target(tmp_path_factory.mktemp("vispec") / "target")
    with open(target / "text.jsonl", "w") as f:
        for i in range(6):
            messages = [
                {"role": "user", "content": f"What colour is square {i} ?"},
                {"role": "assistant", "content": f"It is a {['red', 'green', 'blue'][i % 3]} square with {i} dots ."},
            ]
            f.write(json.dumps({"messages": messages}) + "\n")
    return target


@pytest.fixture(scope="module")
def stage1_appliance(stage1_target: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("logs") / "stage1.log"
    with ServerProcess(["--model", str(stage1_target), *APPLIANCE_ARGS], log_path=log) as proc:
        yield proc


def write_config(
    tmp: Path, mode: str, recipe: str, target: Path, data: Path, url: str, *, backend: str = "remote", packed: int = 0
) -> Path:
    config = tmp / f"{recipe}-{mode}.yaml"
    config.write_text(
        RECIPE_YAML.format(
            recipe=recipe,
            target=target,
            backend=backend,
            url=url,
            data=data,
            out=tmp / f"{recipe}-{mode}",
            packed=packed,
            micro_batch_size=1 if packed else 2,
        )
    )
    return config


def run(mode: str, config: Path, out: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PYTHON, str(RUNNER), mode, str(out), "-c", str(config)],
        env=python_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


def trained(mode: str, config: Path, tmp: Path) -> dict[str, object]:
    out = tmp / f"{config.stem}-{mode}.pt"
    proc = run(mode, config, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result: dict[str, object] = torch.load(out)
    return result


def assert_same_training(remote: dict[str, object], colocated: dict[str, object]) -> None:
    assert remote["backend"] == "eagle3_client.eagle.RemoteEagleTargetModel"
    assert remote["target_model"] == "ConfigOnlyTarget"  # no target weights in the trainer
    assert str(colocated["backend"]).endswith(".HFEagleTargetModel")
    assert remote["steps"] == colocated["steps"] and int(colocated["steps"]) >= 2  # type: ignore[call-overload]

    batches, want_batches = remote["batches"], colocated["batches"]
    assert isinstance(batches, list) and isinstance(want_batches, list) and len(batches) == len(want_batches) >= 2
    for got, want in zip(batches, want_batches, strict=True):
        assert got.keys() == want.keys()
        for key in want:
            assert got[key].dtype == want[key].dtype and got[key].shape == want[key].shape, key
            assert torch.equal(got[key], want[key]), key
        assert bool(want["loss_mask"].any())  # supervised tokens

    losses, want = remote["losses"], colocated["losses"]
    assert isinstance(losses, torch.Tensor) and isinstance(want, torch.Tensor)
    assert len(want) == len(want_batches) and bool(torch.isfinite(want).all()) and bool((want > 0).all())
    assert torch.equal(losses, want)
    assert len(set(want.tolist())) == len(want)  # a loss per step, not one value repeated

    final, final_want = remote["final"], colocated["final"]
    assert isinstance(final, dict) and isinstance(final_want, dict) and final.keys() == final_want.keys()
    assert all(torch.equal(final[k], final_want[k]) for k in final_want)


@pytest.mark.parametrize(
    ("recipe", "packed"), [("TrainEagle1Recipe", 0), ("TrainEagle1Recipe", 96), ("TrainEagle2Recipe", 0)]
)
def test_eagle_recipes_losses_and_weights_are_the_colocated_ones(
    recipe: str, packed: int, eagle_target: Path, appliances: list[ServerProcess], tmp_path: Path
) -> None:
    data = eagle_target / "train.jsonl"
    config = write_config(tmp_path, "run", recipe, eagle_target, data, appliances[0].url, packed=packed)
    remote, colocated = trained("remote", config, tmp_path), trained("colocated", config, tmp_path)
    assert colocated["target_model"] == "LlamaForCausalLM"
    assert_same_training(remote, colocated)
    if packed:
        seq_lens = [b["seq_lens"] for b in remote["batches"]]  # type: ignore[union-attr]
        assert max(int((s > 0).sum(1).max()) for s in seq_lens) > 1  # rows really packed


def test_vispec_stage1_losses_and_weights_are_the_colocated_ones(
    stage1_target: Path, stage1_appliance: ServerProcess, tmp_path: Path
) -> None:
    recipe = "TrainVispecStage1Recipe"
    config = write_config(tmp_path, "run", recipe, stage1_target, stage1_target / "text.jsonl", stage1_appliance.url)
    remote, colocated = trained("remote", config, tmp_path), trained("colocated", config, tmp_path)
    assert colocated["target_model"] == "Qwen2_5_VLForConditionalGeneration"
    assert_same_training(remote, colocated)
    # The draft's embeddings are the target's (fetched from the appliance in the remote run), frozen.
    from safetensors.torch import load_file

    weights = load_file(stage1_target / "model.safetensors")
    target_embed = next(v for k, v in weights.items() if k.endswith("embed_tokens.weight"))
    final = remote["final"]
    assert isinstance(final, dict)
    assert torch.equal(next(v for k, v in final.items() if k.endswith("embed_tokens.weight")), target_embed)


def test_a_stream_is_refused_before_anything_loads(
    eagle_target: Path, appliances: list[ServerProcess], tmp_path: Path
) -> None:
    data = eagle_target / "train.jsonl"
    config = write_config(
        tmp_path, "stream", "TrainEagle1Recipe", eagle_target, data, appliances[0].url, backend="stream"
    )
    proc = run("remote", config, tmp_path / "stream.pt")
    assert proc.returncode != 0
    assert "streams carry no EAGLE-1/2 captures" in proc.stderr
    assert not (tmp_path / "stream.pt").exists()
