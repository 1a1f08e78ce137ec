"""DFlash-family recipes train against an appliance exactly as against their co-located target.

Real runs of NeMo AutoModel's ``TrainDFlashRecipe`` and ``TrainJetSpecRecipe`` on the CPU, each
in its own process, from one YAML: our launcher (``python -m eagle3_client.automodel_launch``'s
code) with ``target_model_backend: remote`` against a real appliance, and the recipe module's
own ``main``, which loads the target itself. The recipes support Qwen3-shaped targets only, so
the target is a tiny Qwen3 made here from a seed. Losses must be equal step for step and the
final draft weights bit for bit, with and without packed rows; the remote run must have loaded no
target weights.
See ``dflash_recipe_runner.py`` for the instruments.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from eagle3_appliance.launch import ServerProcess
from tests.integration.automodel_support import PYTHON, import_or_skip, make_qwen3_recipe_target, python_env

import_or_skip("nemo_automodel.recipes.llm.train_dflash")
import_or_skip("nemo_automodel.recipes.llm.train_jetspec")

RUNNER = Path(__file__).with_name("dflash_recipe_runner.py")

RECIPE_YAML = """\
recipe: {recipe}
dist_env:
  backend: gloo
recipe_args:
  target_model_name_or_path: {target}
  target_model_backend: remote
  remote_urls: ["{url}"]
  remote_timeout: 60
  train_data_path: {target}/train.jsonl
  output_dir: {out}
  seq_length: 40
  micro_batch_size: 2
  num_epochs: 1
  mask_token_id: 1000      # above the tokenizer's 300 ids: never real content
  block_size: 4
  num_anchors: 8
  draft_num_hidden_layers: 1
  attention_backend: sdpa
  log_every_steps: 1
  shuffle_seed: 42
  packed_sequence_size: {packed}
optimizer:
  lr: 1.0e-3
checkpoint:
  enabled: false
"""


@pytest.fixture(scope="module")
def qwen3_target(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_qwen3_recipe_target(tmp_path_factory.mktemp("qwen3"), samples=8)


@pytest.fixture(scope="module")
def qwen3_appliance(qwen3_target: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("logs") / "qwen3.log"
    with ServerProcess(["--model", str(qwen3_target), "--device", "cpu"], log_path=log) as proc:
        yield proc


def run(mode: str, recipe: str, target: Path, url: str, tmp: Path, packed: int = 0) -> dict[str, object]:
    config = tmp / f"{recipe}.yaml"
    out_dir = tmp / f"{recipe}-{mode}"
    config.write_text(RECIPE_YAML.format(recipe=recipe, target=target, url=url, out=out_dir, packed=packed))
    out = tmp / f"{recipe}-{mode}.pt"
    proc = subprocess.run(
        [PYTHON, str(RUNNER), mode, str(out), "-c", str(config)],
        env=python_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result: dict[str, object] = torch.load(out)
    return result


@pytest.mark.parametrize("recipe", ["TrainDFlashRecipe", "TrainJetSpecRecipe"])
def test_a_few_cpu_steps_give_the_colocated_losses(
    recipe: str, qwen3_target: Path, qwen3_appliance: ServerProcess, tmp_path: Path
) -> None:
    remote = run("remote", recipe, qwen3_target, qwen3_appliance.url, tmp_path)
    colocated = run("colocated", recipe, qwen3_target, qwen3_appliance.url, tmp_path)
    assert remote["backend"] == "eagle3_client.dflash.RemoteDFlashTargetModel"
    assert remote["target_model"] == "ConfigOnlyTarget"  # no target weights in the trainer
    assert colocated["target_model"] == "Qwen3ForCausalLM"
    losses, want = remote["losses"], colocated["losses"]
    assert isinstance(losses, torch.Tensor) and isinstance(want, torch.Tensor)
    assert len(want) == 4 and torch.equal(losses, want)
    final, final_want = remote["final"], colocated["final"]
    assert isinstance(final, dict) and isinstance(final_want, dict) and final.keys() == final_want.keys()
    assert all(torch.equal(final[k], final_want[k]) for k in final_want)


@pytest.mark.parametrize("recipe", ["TrainDFlashRecipe", "TrainJetSpecRecipe"])
def test_packed_rows_give_the_colocated_losses(
    recipe: str, qwen3_target: Path, qwen3_appliance: ServerProcess, tmp_path: Path
) -> None:
    """``packed_sequence_size > 0``: the recipe packs rows with upstream's packer, our target serves them."""
    remote = run("remote", recipe, qwen3_target, qwen3_appliance.url, tmp_path, packed=96)
    colocated = run("colocated", recipe, qwen3_target, qwen3_appliance.url, tmp_path, packed=96)
    assert remote["backend"] == "eagle3_client.dflash.RemoteDFlashTargetModel"
    assert remote["target_model"] == "ConfigOnlyTarget"
    losses, want = remote["losses"], colocated["losses"]
    assert isinstance(losses, torch.Tensor) and isinstance(want, torch.Tensor)
    assert len(want) >= 1 and torch.equal(losses, want)
    assert remote["documents"] == colocated["documents"] and max(remote["documents"]) > 1  # rows really packed
    final, final_want = remote["final"], colocated["final"]
    assert isinstance(final, dict) and isinstance(final_want, dict) and final.keys() == final_want.keys()
    assert all(torch.equal(final[k], final_want[k]) for k in final_want)


class _Args(dict):  # type: ignore[type-arg]
    """The recipe's ``cfg.recipe_args`` as the recipe reads it (``.get``)."""


def test_context_parallelism_is_refused_with_the_reason() -> None:
    from nemo_automodel.recipes.llm.train_dflash import TrainDFlashRecipe

    from eagle3_client.automodel import remote_dflash_recipe

    recipe_cls = remote_dflash_recipe(TrainDFlashRecipe)
    recipe = recipe_cls.__new__(recipe_cls)
    recipe.cfg = type("Cfg", (), {"recipe_args": _Args(target_model_backend="remote")})()
    recipe.cp_mesh = type("Mesh", (), {"size": lambda self: 2})()
    with pytest.raises(ValueError, match=r"context parallelism \(cp_size>1\)"):
        recipe._build_target_wrapper([1, 2])
    assert recipe_cls.__name__ == "TrainDFlashRecipe" and issubclass(recipe_cls, TrainDFlashRecipe)
