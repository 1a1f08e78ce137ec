"""The EAGLE-3 recipe trains from the stream (issue #31): ``target_model_backend: stream``.

The producer runs in recipe mode (``eagle3-appliance produce -c recipe.yaml``: the recipe's own
data pipeline, one run per epoch and rank); the trainer is our launcher with the stream
backend; the reference is upstream's own recipe ``main`` with its co-located target, from the
same YAML. With ``train_shuffle: false`` (the only order a producer and a co-located trainer
share; see ``eagle3_appliance.produce_recipe``) the losses are equal step for step and the final
draft weights bit for bit, padded and packed.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from eagle3_appliance.launch import ServerProcess
from tests.integration.automodel_support import PYTHON, import_or_skip, make_recipe_target, python_env

import_or_skip("nemo_automodel.recipes.llm.train_eagle3")

RUNNER = Path(__file__).with_name("recipe_runner.py")
SAMPLES, MICRO_BATCH = 12, 2

RECIPE_YAML = """\
recipe: TrainEagle3Recipe
dist_env:
  backend: gloo
recipe_args:
  target_model_name_or_path: {target}
  target_model_backend: stream
  remote_urls: ["{url}"]
  stream_queue: {queue}
  stream_run_id: {run_id}
  train_data_path: {target}/train.jsonl
  output_dir: {out}
  seq_length: 40
  micro_batch_size: {micro_batch}
  num_epochs: {epochs}
  ttt_steps: 3
  draft_vocab_size: 512
  log_every_steps: 1
  shuffle_seed: 42
  train_shuffle: false
  packed_sequence_size: {packed}
optimizer:
  lr: 1.0e-3
checkpoint:
  enabled: false
"""


@pytest.fixture(scope="module")
def target_dir(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_recipe_target(model_dir, tmp_path_factory.mktemp("stream-recipe") / "target", samples=SAMPLES)


@pytest.fixture(scope="module")
def fleet(target_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[ServerProcess]]:
    logs = tmp_path_factory.mktemp("stream-recipe-servers")
    procs = [
        ServerProcess(["--model", str(target_dir), "--device", "cpu"], log_path=logs / f"a{i}.log") for i in range(2)
    ]
    try:
        for proc in procs:
            proc.start()
        yield procs
    finally:
        for proc in procs:
            proc.stop()


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


@pytest.mark.parametrize(("packed", "epochs"), [(0, 2), (64, 1)], ids=["padded-2-epochs", "packed"])
def test_the_recipe_trains_from_the_stream_as_colocated(
    fleet: list[ServerProcess], target_dir: Path, tmp_path: Path, packed: int, epochs: int
) -> None:
    run_id = f"recipe-{packed}-{epochs}"
    queue = "appliance://" + fleet[0].url.removeprefix("http://")
    yaml_path = tmp_path / "recipe.yaml"
    yaml_path.write_text(
        RECIPE_YAML.format(
            target=target_dir,
            url=fleet[0].url,
            queue=queue,
            run_id=run_id,
            out=tmp_path / "out",
            micro_batch=MICRO_BATCH,
            epochs=epochs,
            packed=packed,
        )
    )
    urls = ",".join(p.url for p in fleet)
    logs = {name: tmp_path / f"{name}.log" for name in ("producer", "stream", "colocated")}
    producer = _start(
        ["-m", "eagle3_appliance", "produce", "--urls", urls, "--queue", queue, "--run-id", run_id,
         "-c", str(yaml_path), "--timeout", "380"],
        logs["producer"],
    )  # fmt: skip
    stream = _start([str(RUNNER), "remote", str(tmp_path / "stream.pt"), "-c", str(yaml_path)], logs["stream"])
    colocated = _start(
        [str(RUNNER), "colocated", str(tmp_path / "colocated.pt"), "-c", str(yaml_path),
         "--recipe_args.target_model_backend=colocated", "--recipe_args.target_prefetch_depth=0"],
        logs["colocated"],
    )  # fmt: skip
    stream_out = _finish(stream, logs["stream"])
    _finish(colocated, logs["colocated"])
    produced = _finish(producer, logs["producer"])
    assert f"in {epochs} run(s) closed" in produced  # one run per epoch (one trainer rank)
    assert "from the stream: run" in stream_out
    s, c = torch.load(tmp_path / "stream.pt"), torch.load(tmp_path / "colocated.pt")
    assert s["backend"].startswith("eagle3_client.automodel.") and c["backend"].endswith("HFEagle3TargetModel")
    steps = int(c["losses"].shape[0])
    assert steps > 0 and s["losses"].shape == c["losses"].shape
    assert bool(torch.isfinite(c["losses"]).all()) and int((c["losses"] > 0).sum()) >= steps - 1
    assert all(torch.equal(s["initial"][k], c["initial"][k]) for k in c["initial"])
    assert torch.equal(s["losses"], c["losses"]), f"stream {s['losses'].tolist()} != co-located {c['losses'].tolist()}"
    assert not torch.equal(c["final"]["model.fc.weight"], c["initial"]["model.fc.weight"])
    assert [k for k in c["final"] if not torch.equal(s["final"][k], c["final"][k])] == []


def test_two_data_parallel_trainers_each_train_their_share_once(
    fleet: list[ServerProcess], target_dir: Path, tmp_path: Path
) -> None:
    """Under torchrun (gloo, two ranks) each rank trains its DistributedSampler share of every epoch
    from its own runs, once, as the co-located DP run does: losses per rank and final weights equal."""
    from eagle3_appliance.launch import free_port

    run_id = "recipe-dp"
    queue = "appliance://" + fleet[0].url.removeprefix("http://")
    yaml_path = tmp_path / "recipe.yaml"
    yaml_path.write_text(
        RECIPE_YAML.format(
            target=target_dir, url=fleet[0].url, queue=queue, run_id=run_id, out=tmp_path / "out",
            micro_batch=MICRO_BATCH, epochs=2, packed=0,
        )
    )  # fmt: skip
    torchrun = [PYTHON, "-m", "torch.distributed.run", "--nproc-per-node=2", "--nnodes=1"]
    logs = {name: tmp_path / f"{name}.log" for name in ("producer", "stream", "colocated")}
    producer = _start(
        ["-m", "eagle3_appliance", "produce", "--urls", ",".join(p.url for p in fleet), "--queue", queue,
         "--run-id", run_id, "-c", str(yaml_path), "--trainers", "2", "--timeout", "380"],
        logs["producer"],
    )  # fmt: skip
    stream = subprocess.Popen(
        [*torchrun, f"--master-port={free_port()}", str(RUNNER), "remote", str(tmp_path / "stream.pt"),
         "-c", str(yaml_path)],
        env=python_env(), stdout=open(logs["stream"], "wb"), stderr=subprocess.STDOUT,  # noqa: SIM115
    )  # fmt: skip
    colocated = subprocess.Popen(
        [*torchrun, f"--master-port={free_port()}", str(RUNNER), "colocated", str(tmp_path / "colocated.pt"),
         "-c", str(yaml_path), "--recipe_args.target_model_backend=colocated",
         "--recipe_args.target_prefetch_depth=0"],
        env=python_env(), stdout=open(logs["colocated"], "wb"), stderr=subprocess.STDOUT,  # noqa: SIM115
    )  # fmt: skip
    _finish(stream, logs["stream"])
    _finish(colocated, logs["colocated"])
    produced = _finish(producer, logs["producer"])
    per_rank = SAMPLES // 2 // MICRO_BATCH
    assert f"{2 * 2 * per_rank} samples in 4 run(s) closed" in produced  # 2 epochs x 2 ranks, each acked once
    for suffix in ("", ".rank1"):
        s = torch.load(tmp_path / f"stream.pt{suffix}")
        c = torch.load(tmp_path / f"colocated.pt{suffix}")
        assert s["losses"].shape == c["losses"].shape == (2 * per_rank,)
        assert torch.equal(s["losses"], c["losses"]), f"rank{suffix}: {s['losses'].tolist()} != {c['losses'].tolist()}"
        assert [k for k in c["final"] if not torch.equal(s["final"][k], c["final"][k])] == []


def test_a_trainer_restarted_from_its_checkpoint_resumes_where_its_acks_stand(
    fleet: list[ServerProcess], target_dir: Path, tmp_path: Path
) -> None:
    """Kill the trainer mid-epoch after a step checkpoint; the restarted one loads it and takes the
    stream from its acked position: every sample of every epoch acked once, none computed twice."""
    import signal
    import time

    import httpx

    from eagle3_client.automodel_stream import stream_run_id
    from eagle3_client.streaming.appliance_queue import ApplianceQueue

    run_id = "recipe-restart"
    queue = "appliance://" + fleet[0].url.removeprefix("http://")
    yaml_path = tmp_path / "recipe.yaml"
    text = RECIPE_YAML.format(
        target=target_dir, url=fleet[0].url, queue=queue, run_id=run_id, out=tmp_path / "out",
        micro_batch=MICRO_BATCH, epochs=2, packed=0,
    )  # fmt: skip
    text = text.replace(
        "checkpoint:\n  enabled: false\n", f"checkpoint:\n  enabled: true\n  checkpoint_dir: {tmp_path}/ckpt\n"
    )
    yaml_path.write_text(text.replace("  log_every_steps: 1\n", "  log_every_steps: 1\n  ckpt_every_steps: 2\n"))

    def produced() -> float:
        return sum(
            float(line.split()[-1])
            for p in fleet
            for line in httpx.get(p.url + "/metrics").text.splitlines()
            if line.startswith("eagle3_stream_produced_total ")
        )

    before = produced()
    logs = {name: tmp_path / f"{name}.log" for name in ("producer", "first", "second")}
    producer = _start(
        ["-m", "eagle3_appliance", "produce", "--urls", ",".join(p.url for p in fleet), "--queue", queue,
         "--run-id", run_id, "-c", str(yaml_path), "--visibility-timeout", "10", "--timeout", "380"],
        logs["producer"],
    )  # fmt: skip
    first = _start([str(RUNNER), "remote", str(tmp_path / "first.pt"), "-c", str(yaml_path)], logs["first"])
    epoch0 = ApplianceQueue(queue, stream_run_id(run_id, 0, 0))
    deadline = time.monotonic() + 300
    while not ((tmp_path / "ckpt").exists() and any((tmp_path / "ckpt").iterdir()) and epoch0.state().acked >= 3):
        assert time.monotonic() < deadline and first.poll() is None, logs["first"].read_text()[-3000:]
        time.sleep(0.1)
    first.send_signal(signal.SIGKILL)
    first.wait(30)
    acked_before = epoch0.state().acked
    second = _start([str(RUNNER), "remote", str(tmp_path / "second.pt"), "-c", str(yaml_path)], logs["second"])
    second_out = _finish(second, logs["second"])
    report = _finish(producer, logs["producer"])
    total = 2 * SAMPLES // MICRO_BATCH
    assert f"{total} samples in 2 run(s) closed" in report  # each acked exactly once
    assert produced() - before == total  # no sample computed twice across the restart
    assert "from the stream: run recipe-restart.e0.r0" in second_out  # it resumed epoch 0's run
    trained = torch.load(tmp_path / "second.pt")["losses"].shape[0]
    assert trained == total - acked_before  # the rest of epoch 0, then epoch 1: nothing twice
    epoch0.close()
