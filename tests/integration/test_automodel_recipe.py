"""The whole EAGLE-3 recipe, launched with our launcher against an appliance, trains like co-located.

Two real runs of NeMo AutoModel's ``TrainEagle3Recipe`` on the CPU, each in its own process,
from one YAML: ``python -m eagle3_client.automodel_launch``'s code with ``target_model_backend:
remote`` against a real appliance (with our ``remote_encoding`` option set by a YAML override
and a token from the environment), and upstream's own recipe ``main`` with ``colocated``.
Everything between the YAML and the optimizer is the recipe's: config parsing, tokenizer, chat
dataset, draft-vocabulary selection, draft construction, prefetch, TTT loss, clipping, LR
schedule. See ``recipe_runner.py`` for the two instruments (loss recording, a seeded draft
init) and the CPU target loader of the co-located run.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from eagle3_appliance.launch import ServerProcess
from eagle3_client.automodel_launch import check_config
from tests.integration.automodel_support import PYTHON, import_or_skip, make_recipe_target, python_env

import_or_skip("nemo_automodel.recipes.llm.train_eagle3")
config_loader = import_or_skip("nemo_automodel.components.config.loader")

RUNNER = Path(__file__).with_name("recipe_runner.py")
SAMPLES, MICRO_BATCH = 12, 2
TOKEN = "ci-token-7f3a"
ENCODING = "logits"  # bit-exact where client and server run the same softmax kernel (CPU and CPU here)

RECIPE_YAML = """\
recipe: TrainEagle3Recipe
dist_env:
  backend: gloo            # the CPU; nccl on GPUs
recipe_args:
  target_model_name_or_path: {target}
  target_model_backend: remote
  remote_urls: ["{url}"]
  remote_timeout: 60
  remote_max_retries: 1
  target_prefetch_depth: 1
  train_data_path: {target}/train.jsonl
  output_dir: {out}
  seq_length: 40
  micro_batch_size: {micro_batch}
  num_epochs: 1
  ttt_steps: 3
  draft_vocab_size: 512
  log_every_steps: 1
  shuffle_seed: 42
optimizer:
  lr: 1.0e-3
checkpoint:
  enabled: false
"""


@pytest.fixture(scope="module")
def target_dir(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_recipe_target(model_dir, tmp_path_factory.mktemp("recipe") / "target", samples=SAMPLES)


@pytest.fixture(scope="module")
def appliance(target_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The appliance serving the recipe's target folder, as docs/automodel.md shows."""
    log = tmp_path_factory.mktemp("recipe-server") / "eagle3_appliance.log"
    with ServerProcess(
        ["--model", str(target_dir), "--device", "cpu"], log_path=log, env={"EAGLE3_AUTH_TOKEN": TOKEN}
    ) as proc:
        yield proc


def _start(mode: str, out: Path, args: list[str], log: Path, **env: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [PYTHON, str(RUNNER), mode, str(out), *args],
        env=python_env(**env),
        stdout=open(log, "wb"),  # noqa: SIM115 - the child owns it
        stderr=subprocess.STDOUT,
    )


def _finish(proc: subprocess.Popen[bytes], log: Path) -> str:
    try:
        code = proc.wait(timeout=400)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise
    text = log.read_text(errors="replace")
    assert code == 0, f"recipe run failed ({code}):\n{text[-4000:]}"
    return text


def test_recipe_trains_identically_through_our_launcher_and_colocated(
    appliance: ServerProcess, target_dir: Path, tmp_path: Path
) -> None:
    # The appliance enforces the token, so the remote run below can only pass if it sent it.
    assert httpx.post(appliance.url + "/model_info", trust_env=False).status_code == 401
    yaml_path = tmp_path / "recipe.yaml"
    yaml_path.write_text(
        RECIPE_YAML.format(target=target_dir, url=appliance.url, out=tmp_path / "out", micro_batch=MICRO_BATCH)
    )
    remote_log, colocated_log = tmp_path / "remote.log", tmp_path / "colocated.log"
    # The same YAML; the co-located run only overrides the backend (prefetch needs a remote one).
    # Our client's options reach it from the YAML (an override here) and from the environment.
    remote = _start(
        "remote",
        tmp_path / "remote.pt",
        ["-c", str(yaml_path), f"--recipe_args.remote_encoding={ENCODING}"],
        remote_log,
        EAGLE3_AUTH_TOKEN=TOKEN,
    )
    colocated = _start(
        "colocated",
        tmp_path / "colocated.pt",
        ["-c", str(yaml_path), "--recipe_args.target_model_backend=colocated", "--recipe_args.target_prefetch_depth=0"],
        colocated_log,
    )
    remote_out, colocated_out = _finish(remote, remote_log), _finish(colocated, colocated_log)

    # The recipe built our client (the launcher logs the class of the recipe's target_wrapper).
    assert "target backend: eagle3_client.automodel." in remote_out
    assert "POST /session" not in colocated_out and "/generate" not in colocated_out
    r = torch.load(tmp_path / "remote.pt")
    c = torch.load(tmp_path / "colocated.pt")
    assert r["backend"].startswith("eagle3_client.automodel.")
    assert c["backend"].endswith("HFEagle3TargetModel")
    assert c["encoding"] is None
    assert r["encoding"]["requested"] == ENCODING  # the YAML's choice reached the client...
    assert set(r["encoding"]["negotiated"].values()) == {ENCODING}  # ...and the appliance agreed

    steps = SAMPLES // MICRO_BATCH
    assert r["losses"].shape == c["losses"].shape == (steps,)
    assert "Training complete: global_step=6" in remote_out
    # Finite, and supervised on most steps (a step whose target argmax never falls in the draft
    # vocabulary has nothing to learn from and a loss of exactly 0).
    assert bool(torch.isfinite(c["losses"]).all()) and int((c["losses"] > 0).sum()) >= steps - 1
    assert all(torch.equal(r["initial"][k], c["initial"][k]) for k in c["initial"])
    assert torch.equal(r["losses"], c["losses"]), f"remote {r['losses'].tolist()} != co-located {c['losses'].tolist()}"
    assert not torch.equal(c["final"]["model.fc.weight"], c["initial"]["model.fc.weight"])  # it trained
    differing = [k for k in c["final"] if not torch.equal(r["final"][k], c["final"][k])]
    assert differing == []


PACKED = 64  # packed_sequence_size: the chat samples are 20-30 tokens, so two or three per row


def test_packed_rows_train_identically_through_our_launcher_and_colocated(
    appliance: ServerProcess, target_dir: Path, tmp_path: Path
) -> None:
    """``packed_sequence_size > 0`` with ``remote``: the recipe's gate is lifted for our backend only,
    prefetch sends the packing, and the losses are the co-located packed run's, bit for bit."""
    yaml_path = tmp_path / "recipe.yaml"
    yaml_path.write_text(
        RECIPE_YAML.format(target=target_dir, url=appliance.url, out=tmp_path / "out", micro_batch=MICRO_BATCH)
    )
    packed = f"--recipe_args.packed_sequence_size={PACKED}"
    remote_log, colocated_log = tmp_path / "remote.log", tmp_path / "colocated.log"
    remote = _start(
        "remote", tmp_path / "remote.pt", ["-c", str(yaml_path), packed], remote_log, EAGLE3_AUTH_TOKEN=TOKEN
    )
    colocated = _start(
        "colocated",
        tmp_path / "colocated.pt",
        [
            "-c",
            str(yaml_path),
            packed,
            "--recipe_args.target_model_backend=colocated",
            "--recipe_args.target_prefetch_depth=0",
        ],
        colocated_log,
    )
    remote_out, _ = _finish(remote, remote_log), _finish(colocated, colocated_log)
    assert "only supported with the colocated target backend" not in remote_out
    r, c = torch.load(tmp_path / "remote.pt"), torch.load(tmp_path / "colocated.pt")
    assert r["backend"].startswith("eagle3_client.automodel.") and c["backend"].endswith("HFEagle3TargetModel")
    steps = int(c["losses"].shape[0])
    assert 0 < steps < SAMPLES // MICRO_BATCH, "rows should hold several samples each"
    assert bool(torch.isfinite(c["losses"]).all()) and int((c["losses"] > 0).sum()) >= steps - 1
    assert torch.equal(r["losses"], c["losses"]), f"remote {r['losses'].tolist()} != co-located {c['losses'].tolist()}"
    differing = [k for k in c["final"] if not torch.equal(r["final"][k], c["final"][k])]
    assert differing == []


def test_launcher_refuses_a_yaml_for_another_recipe(tmp_path: Path) -> None:
    path = tmp_path / "other.yaml"
    path.write_text("recipe: TrainFinetuneRecipeForNextTokenPrediction\nrecipe_args: {}\n")
    with pytest.raises(SystemExit, match="EAGLE-3 recipe"):
        check_config(config_loader.load_yaml_config(str(path)))


def test_launcher_help_runs_without_a_config() -> None:
    out = subprocess.run(
        [PYTHON, "-m", "eagle3_client.automodel_launch", "--help"],
        env=python_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "python -m eagle3_client.automodel_launch -c recipe.yaml" in out.stdout
    assert "torchrun" in out.stdout
