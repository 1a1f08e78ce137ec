"""ViSpec's stage-2 recipe trains against an appliance exactly as against its co-located target.

Real runs of NeMo AutoModel's ``TrainVispecRecipe`` on the CPU, each in its own process, from one
YAML: our launcher (``python -m eagle3_client.automodel_launch``'s code) with
``target_model_backend: remote`` against a real appliance serving the target, and the recipe
module's own ``main``, which loads the target with ``AutoModelForImageTextToText`` itself. The
target is a tiny Qwen2.5-VL made here from a seed, with a tokenizer, an image processor and a
ShareGPT data set of generated images (``tests/vlm_support.py``); upstream's data pipeline
(``make_meta_dataset``, its VLM collate and the processor) feeds both runs. Upstream's training
loop runs unchanged, forward, backward and optimizer steps: the target batches, the loss of every
step and the draft's weights after training must be equal bit for bit, and the remote run must
have loaded no target weights. See ``vispec_recipe_runner.py`` for the instruments and the two
stand-ins for packages this environment lacks (``torchvision``, ``qwen_vl_utils``).
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from eagle3_appliance.launch import ServerProcess
from tests.integration.automodel_support import PYTHON, import_or_skip, python_env
from tests.vlm_support import APPLIANCE_ARGS, PROCESSOR_BOUNDS, make_vispec_recipe_target

import_or_skip("nemo_automodel.recipes.llm.train_vispec")

RUNNER = Path(__file__).with_name("vispec_recipe_runner.py")
SAMPLES = 4

RECIPE_YAML = """\
recipe: TrainVispecRecipe
dist_env:
  backend: gloo
recipe_args:
  target_model_name_or_path: {target}
  target_model_backend: {backend}
  remote_urls: ["{url}"]
  remote_timeout: 60
  output_dir: {out}
  seq_length: 48
  micro_batch_size: 1
  num_epochs: 1
  draft_num_hidden_layers: 1
  image_min_pixels: {min_pixels}
  image_max_pixels: {max_pixels}
  log_every_steps: 1
  shuffle_seed: 42
dataset:
  _target_: nemo_automodel.components.datasets.vlm.datasets.make_meta_dataset
  path_or_dataset: {target}/meta.json
optimizer:
  lr: 1.0e-3
checkpoint:
  enabled: false
"""


@pytest.fixture(scope="module")
def vispec_target(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_vispec_recipe_target(tmp_path_factory.mktemp("vispec") / "target", samples=SAMPLES)


@pytest.fixture(scope="module")
def vispec_appliance(vispec_target: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("logs") / "vispec.log"
    with ServerProcess(["--model", str(vispec_target), *APPLIANCE_ARGS], log_path=log) as proc:
        yield proc


def write_config(tmp: Path, mode: str, target: Path, url: str, backend: str = "remote") -> Path:
    config = tmp / f"vispec-{mode}.yaml"
    config.write_text(
        RECIPE_YAML.format(
            target=target,
            backend=backend,
            url=url,
            out=tmp / f"vispec-{mode}",
            min_pixels=PROCESSOR_BOUNDS["min_pixels"],
            max_pixels=PROCESSOR_BOUNDS["max_pixels"],
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


def trained(mode: str, target: Path, url: str, tmp: Path) -> dict[str, object]:
    out = tmp / f"vispec-{mode}.pt"
    proc = run(mode, write_config(tmp, mode, target, url), out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result: dict[str, object] = torch.load(out)
    return result


def test_the_recipes_losses_and_weights_are_the_colocated_ones(
    vispec_target: Path, vispec_appliance: ServerProcess, tmp_path: Path
) -> None:
    remote = trained("remote", vispec_target, vispec_appliance.url, tmp_path)
    colocated = trained("colocated", vispec_target, vispec_appliance.url, tmp_path)
    assert remote["backend"] == "eagle3_client.vispec.RemoteVispecTargetModel"
    assert remote["target_model"] == "ConfigOnlyTarget"  # no target weights in the trainer
    assert colocated["backend"].endswith(".HFVispecTargetModel")  # type: ignore[union-attr]
    assert colocated["target_model"] == "Qwen2_5_VLForConditionalGeneration"
    assert remote["steps"] == colocated["steps"] == SAMPLES  # one optimizer step per micro-batch

    batches, want_batches = remote["batches"], colocated["batches"]
    assert isinstance(batches, list) and isinstance(want_batches, list) and len(batches) == len(want_batches) == SAMPLES
    for got, want in zip(batches, want_batches, strict=True):
        assert got.keys() == want.keys()
        for key in want:
            assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), key
        assert bool(want["image_mask"].any()) and bool(want["loss_mask"].any())  # images and supervised tokens

    losses, want = remote["losses"], colocated["losses"]
    assert isinstance(losses, torch.Tensor) and isinstance(want, torch.Tensor)
    assert len(want) == SAMPLES and bool(torch.isfinite(want).all()) and bool((want > 0).all())
    assert torch.equal(losses, want)
    assert len(set(want.tolist())) == SAMPLES  # a loss per step, not one value repeated

    final, final_want = remote["final"], colocated["final"]
    assert isinstance(final, dict) and isinstance(final_want, dict) and final.keys() == final_want.keys()
    assert any(k.startswith("img_adaptor.") for k in final_want)  # the ViSpec draft, with its image modules
    assert all(torch.equal(final[k], final_want[k]) for k in final_want)
    # The draft's embeddings are the target's (fetched from the appliance in the remote run), frozen.
    from safetensors.torch import load_file

    weights = load_file(vispec_target / "model.safetensors")
    target_embed = next(v for k, v in weights.items() if k.endswith("embed_tokens.weight"))
    draft_embed = next(v for k, v in final.items() if k.endswith("embed_tokens.weight"))
    assert torch.equal(draft_embed, target_embed)


def test_the_recipe_trains_from_the_stream_as_colocated(
    vispec_target: Path, vispec_appliance: ServerProcess, tmp_path: Path
) -> None:
    """``target_model_backend: stream``: the producer in recipe mode (the recipe's processor and VLM
    loader, each batch with its vision tensors, ``--capture vispec``), the trainer reading the run
    through ``VispecFeatureLoader``; the reference is the co-located recipe whose loader samples as
    a stream trainer's does. Batches, losses and final weights bit for bit; every sample acked."""
    url = vispec_appliance.url
    queue = "appliance://" + url.removeprefix("http://")
    config = write_config(tmp_path, "stream", vispec_target, url, backend="stream")
    keys = f"  stream_queue: {queue}\n  stream_run_id: vispec-run\n  train_shuffle: true\n"
    config.write_text(config.read_text().replace("recipe_args:\n", "recipe_args:\n" + keys))
    produce = ["--urls", url, "--queue", queue, "--run-id", "vispec-run", "-c", str(config)]
    logs = {name: tmp_path / f"{name}.log" for name in ("producer", "stream", "colocated")}

    def start(args: list[str], name: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [PYTHON, str(RUNNER), *args],
            env=python_env(),
            stdout=open(logs[name], "wb"),
            stderr=subprocess.STDOUT,  # noqa: SIM115
        )

    procs = {
        "producer": start(["produce", "-", *produce, "--capture", "vispec", "--timeout", "280"], "producer"),
        "stream": start(["remote", str(tmp_path / "stream.pt"), "-c", str(config)], "stream"),
        "colocated": start(
            [
                "colocated-sampled",
                str(tmp_path / "colocated.pt"),
                "-c",
                str(config),
                "--recipe_args.target_model_backend=colocated",
            ],
            "colocated",
        ),  # fmt: skip
    }
    for name, proc in procs.items():
        code = proc.wait(timeout=300)
        assert code == 0, f"{name} failed ({code}):\n{logs[name].read_text(errors='replace')[-4000:]}"
    assert "in 1 run(s) closed" in logs["producer"].read_text()
    assert "from the stream: run vispec-run.e0.r0 (vispec)" in logs["stream"].read_text()
    stream, colocated = torch.load(tmp_path / "stream.pt"), torch.load(tmp_path / "colocated.pt")
    assert stream["backend"] == "eagle3_client.automodel_stream_dflash.StreamVispecTarget"
    assert stream["target_model"] == "ConfigOnlyTarget"
    assert stream["steps"] == colocated["steps"] == SAMPLES
    for got, want in zip(stream["batches"], colocated["batches"], strict=True):
        assert got.keys() == want.keys()
        assert all(got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]) for k in want)
    assert torch.equal(stream["losses"], colocated["losses"])
    assert all(torch.equal(stream["final"][k], colocated["final"][k]) for k in colocated["final"])
