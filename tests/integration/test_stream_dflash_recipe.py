"""DFlash-family recipes train from the stream: ``target_model_backend: stream``.

The producer runs in recipe mode (``eagle3-appliance produce -c dflash.yaml --capture dflash:...``:
the recipe's own data pipeline, one run per epoch and rank, the layers the recipe captures); the
trainer is our launcher with the stream backend, which checks every batch of its own loader
against the stream's; the reference is upstream's recipe ``main`` with its co-located target,
from the same YAML, its train loader sampling as a stream trainer's does (``colocated-sampled``
in ``dflash_recipe_runner.py``: alone, upstream's DFlash recipe shuffles with the global RNG).
Losses are equal step for step over two epochs and the final draft weights bit for bit, with and
without the logits (JetSpec). The refusals (another capture, another order) are checked without
servers.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from eagle3_appliance.launch import ServerProcess
from tests.integration.automodel_support import PYTHON, import_or_skip, make_qwen3_recipe_target, python_env

import_or_skip("nemo_automodel.recipes.llm.train_dflash")
import_or_skip("nemo_automodel.recipes.llm.train_jetspec")

RUNNER = Path(__file__).with_name("dflash_recipe_runner.py")
SAMPLES, MICRO_BATCH, DRAFT_LAYERS, TARGET_LAYERS = 8, 2, 1, 8

RECIPE_YAML = """\
recipe: {recipe}
dist_env:
  backend: gloo
recipe_args:
  target_model_name_or_path: {target}
  target_model_backend: stream
  remote_urls: ["{url}"]
  remote_timeout: 60
  stream_queue: {queue}
  stream_run_id: {run_id}
  train_data_path: {target}/train.jsonl
  output_dir: {out}
  seq_length: 40
  micro_batch_size: {micro_batch}
  num_epochs: {epochs}
  mask_token_id: 1000      # above the tokenizer's 300 ids: never real content
  block_size: 4
  num_anchors: 8
  draft_num_hidden_layers: {draft_layers}
  attention_backend: sdpa
  log_every_steps: 1
  shuffle_seed: 42
  train_shuffle: {shuffle}
optimizer:
  lr: 1.0e-3
checkpoint:
  enabled: false
"""


@pytest.fixture(scope="module")
def qwen3_target(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_qwen3_recipe_target(tmp_path_factory.mktemp("qwen3-stream"), samples=SAMPLES, layers=TARGET_LAYERS)


@pytest.fixture(scope="module")
def appliance(qwen3_target: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("stream-dflash-logs") / "qwen3.log"
    with ServerProcess(["--model", str(qwen3_target), "--device", "cpu"], log_path=log) as proc:
        yield proc


def _capture(logits: bool) -> str:
    """The capture the recipe's wrapper asks for: its layer ids (upstream's rule), and the logits for JetSpec."""
    from nemo_automodel.components.speculative.dflash.draft_qwen3 import build_target_layer_ids

    layers = ",".join(str(i) for i in build_target_layer_ids(TARGET_LAYERS, DRAFT_LAYERS))
    return f"dflash+logits:{layers}" if logits else f"dflash:{layers}"


def _start(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([PYTHON, *args], env=python_env(), stdout=open(log, "wb"), stderr=subprocess.STDOUT)  # noqa: SIM115


def _finish(proc: subprocess.Popen[bytes], log: Path) -> str:
    try:
        code = proc.wait(timeout=400)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise
    text = log.read_text(errors="replace")
    assert code == 0, f"run failed ({code}):\n{text[-4000:]}"
    return text


@pytest.mark.parametrize(
    ("recipe", "logits", "shuffle", "epochs"),
    [("TrainDFlashRecipe", False, "false", 2), ("TrainJetSpecRecipe", True, "true", 2)],
    ids=["dflash-in-order", "jetspec-shuffled"],
)
def test_the_recipe_trains_from_the_stream_as_colocated(
    appliance: ServerProcess, qwen3_target: Path, tmp_path: Path, recipe: str, logits: bool, shuffle: str, epochs: int
) -> None:
    run_id = f"{recipe.lower()}-{shuffle}"
    queue = "appliance://" + appliance.url.removeprefix("http://")
    yaml_path = tmp_path / "dflash.yaml"
    yaml_path.write_text(
        RECIPE_YAML.format(
            recipe=recipe,
            target=qwen3_target,
            url=appliance.url,
            queue=queue,
            run_id=run_id,
            out=tmp_path / "out",
            micro_batch=MICRO_BATCH,
            epochs=epochs,
            draft_layers=DRAFT_LAYERS,
            shuffle=shuffle,
        )
    )
    capture = _capture(logits)
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
    assert f"in {epochs} run(s) closed" in produced  # one run per epoch (one trainer rank)
    assert stream_out.count("from the stream: run") == epochs and f"({capture})" in stream_out
    s, c = torch.load(tmp_path / "stream.pt"), torch.load(tmp_path / "colocated.pt")
    assert s["backend"] == "eagle3_client.automodel_stream_dflash.StreamDFlashTarget"
    assert s["target_model"] == "ConfigOnlyTarget" and c["target_model"] == "Qwen3ForCausalLM"
    steps = int(c["losses"].shape[0])
    assert steps == epochs * SAMPLES // MICRO_BATCH and s["losses"].shape == c["losses"].shape
    assert bool(torch.isfinite(c["losses"]).all())
    assert torch.equal(s["losses"], c["losses"]), f"stream {s['losses'].tolist()} != co-located {c['losses'].tolist()}"
    assert s["final"].keys() == c["final"].keys()
    assert [k for k in c["final"] if not torch.equal(s["final"][k], c["final"][k])] == []


# -- the refusals, without servers -------------------------------------------------------


class _Remote:
    target_layer_ids = [1, 4]
    capture_logits = False
    urls = ["http://nowhere:1"]

    def close(self) -> None:
        pass


def _target(epochs: int = 1) -> Any:
    from eagle3_client.automodel_stream import StreamSettings
    from eagle3_client.automodel_stream_dflash import StreamDFlashTarget

    settings = StreamSettings("appliance://nowhere:1", "run-x")
    return StreamDFlashTarget(_Remote(), settings, rank=0, epochs=epochs)  # type: ignore[arg-type]


class _Closable:
    closed = False

    def close(self) -> None:
        self.closed = True


def test_a_run_of_another_capture_is_refused_before_training(monkeypatch: pytest.MonkeyPatch) -> None:
    from eagle3_client.streaming import open as stream_open
    from eagle3_client.streaming.queues import RunMismatch

    queue, store = _Closable(), _Closable()
    store.description = SimpleNamespace(capture="dflash+logits:1,4")  # type: ignore[attr-defined]
    opened: list[str] = []

    def fake_open(url: str, *, run_id: str, **kwargs: Any) -> tuple[Any, Any]:
        opened.append(run_id)
        assert kwargs["in_order"] is True
        return queue, store

    monkeypatch.setattr(stream_open, "open_stream", fake_open)
    target = _target()
    ids = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(RunMismatch, match=r"capture 'dflash\+logits:1,4'; this recipe captures 'dflash:1,4'"):
        target.generate_batch(ids, torch.ones_like(ids), torch.ones_like(ids))
    assert opened == ["run-x.e0.r0"] and queue.closed and store.closed


def test_a_batch_other_than_the_recipes_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from eagle3_client.automodel_stream_dflash import StreamOrderMismatch

    target = _target()
    ids = torch.arange(8).view(2, 4)
    streamed = SimpleNamespace()  # the batch; the check reads the request it was computed from
    request = {"input_ids": ids.flip(0), "loss_mask": torch.ones_like(ids)}
    monkeypatch.setattr(target, "_next", lambda: (streamed, request))
    with pytest.raises(StreamOrderMismatch, match=r"run 'run-x.e0.r0' has other input_ids"):
        target.generate_batch(ids, torch.ones_like(ids), torch.ones_like(ids))
    request["input_ids"] = ids
    assert target.generate_batch(ids, torch.ones_like(ids), torch.ones_like(ids)) is streamed


def test_more_epochs_than_the_runs_hold_are_refused() -> None:
    from eagle3_client.automodel_stream_dflash import StreamOrderMismatch

    target = _target(epochs=1)
    target.start(1)
    ids = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(StreamOrderMismatch, match="more batches than its 1 epoch"):
        target.generate_batch(ids, ids, ids)


def test_the_producer_builds_a_dflash_recipes_runs_without_a_vocabulary(qwen3_target: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from eagle3_appliance.cli import app
    from eagle3_appliance.produce_recipe import recipe_runs

    yaml_path = tmp_path / "dflash.yaml"
    yaml_path.write_text(
        RECIPE_YAML.format(
            recipe="TrainDFlashRecipe", target=qwen3_target, url="http://nowhere:1", queue="appliance://nowhere:1",
            run_id="r", out=tmp_path / "out", micro_batch=MICRO_BATCH, epochs=2, draft_layers=DRAFT_LAYERS,
            shuffle="false",
        )
    )  # fmt: skip
    runs = recipe_runs(str(yaml_path), [], "r", trainers=2)
    assert runs.capture_kind == "dflash" and runs.vocab_mapping is None
    assert [p.run_id for p in runs.plans] == ["r.e0.r0", "r.e0.r1", "r.e1.r0", "r.e1.r1"]
    assert sum(len(p.samples) for p in runs.plans) == 2 * SAMPLES // MICRO_BATCH
    refused = CliRunner().invoke(
        app, ["produce", "--urls", "http://nowhere:1", "--queue", "appliance://nowhere:1", "--run-id", "r",
              "-c", str(yaml_path)],
        env={"COLUMNS": "400", "TERMINAL_WIDTH": "400"},
    )  # fmt: skip
    assert refused.exit_code == 2 and "--capture dflash:" in " ".join(refused.output.split())
