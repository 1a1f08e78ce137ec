"""The DSpark recipe trains against an appliance exactly as against its co-located target.

Real runs of NeMo AutoModel's ``TrainDSparkRecipe`` on the CPU, each in its own process, from one
YAML: our launcher (``python -m eagle3_client.automodel_launch``'s code) with
``target_model_backend: remote`` against a real appliance, and the recipe module's own ``main``,
which loads the target itself. The target is a tiny Qwen3 made here from a seed. The recipe's
FlexAttention has no backward on the CPU, so each run computes the recipe's own losses for its
first batches without gradients (see ``dspark_recipe_runner.py``): the target batches and the
losses must be equal batch for batch and the draft's weights (embeddings and LM head copied from
the target) bit for bit, with and without packed rows and with ``-1`` and the last layer among the
captured ones; the remote run must have loaded no target weights.
See ``dspark_recipe_runner.py`` for the instruments.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from eagle3_appliance.launch import ServerProcess
from tests.integration.automodel_support import PYTHON, import_or_skip, make_qwen3_recipe_target, python_env

import_or_skip("nemo_automodel.recipes.llm.train_dspark")

RUNNER = Path(__file__).with_name("dspark_recipe_runner.py")

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
  target_layer_ids: {layers}
  attention_backend: flex_attention
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


def run(mode: str, target: Path, url: str, tmp: Path, packed: int = 0, layers: str = "null") -> dict[str, object]:
    config = tmp / f"dspark-{mode}.yaml"
    out_dir = tmp / f"dspark-{mode}"
    config.write_text(
        RECIPE_YAML.format(
            recipe="TrainDSparkRecipe", target=target, url=url, out=out_dir, packed=packed, layers=layers
        )
    )
    out = tmp / f"dspark-{mode}.pt"
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


@pytest.mark.parametrize(("packed", "layers"), [(0, "null"), (0, "[-1, 3, 7]"), (96, "[-1, 2, 7]")], ids=str)
def test_the_recipes_losses_and_weights_are_the_colocated_ones(
    packed: int, layers: str, qwen3_target: Path, qwen3_appliance: ServerProcess, tmp_path: Path
) -> None:
    remote = run("remote", qwen3_target, qwen3_appliance.url, tmp_path, packed, layers)
    colocated = run("colocated", qwen3_target, qwen3_appliance.url, tmp_path, packed, layers)
    assert remote["backend"] == "eagle3_client.dspark.RemoteDSparkTargetModel"
    assert remote["target_model"] == "ConfigOnlyTarget"  # no target weights in the trainer
    assert colocated["target_model"] == "Qwen3ForCausalLM"
    losses, want = remote["losses"], colocated["losses"]
    assert isinstance(losses, torch.Tensor) and isinstance(want, torch.Tensor)
    assert 1 <= len(want) <= 3 and torch.equal(losses, want)
    hidden, hidden_want = remote["hidden"], colocated["hidden"]
    assert (
        isinstance(hidden, list) and isinstance(hidden_want, list) and len(hidden) == len(hidden_want) == 2 * len(want)
    )
    assert all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(hidden, hidden_want, strict=True))
    assert remote["documents"] == colocated["documents"]
    if packed:
        assert max(remote["documents"]) > 1  # rows really packed
    final, final_want = remote["final"], colocated["final"]
    assert isinstance(final, dict) and isinstance(final_want, dict) and final.keys() == final_want.keys()
    assert all(torch.equal(final[k], final_want[k]) for k in final_want)
