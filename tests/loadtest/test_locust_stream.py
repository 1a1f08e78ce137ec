"""``--stream-queue``: the ranks as stream consumers, each Locust run its own process against real appliances.

The run comes from a producer the load test starts (``--stream-produce``) or from one started
here, as a user would (``eagle3-appliance produce``). Every batch a rank leases is checked.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from eagle3_appliance.launch import ServerProcess, free_port
from eagle3_client.synthetic import vocab_mapping
from tests.loadtest.conftest import REPO, subprocess_env

pytest.importorskip("nemo_automodel.components.speculative.streaming")

DRAFT_VOCAB = 128
SHAPES = ["--batch-size", "2", "--seq-len", "uniform:16:64", "--max-seq-len", "64", "--draft-vocab", str(DRAFT_VOCAB)]
ROW = ("STREAM", "generate")


@pytest.fixture(scope="module")
def second(appliance: ServerProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A second appliance of the same model (the session's appliance hosts the queue)."""
    logs = tmp_path_factory.mktemp("second")
    cache = tmp_path_factory.mktemp("cache2")
    with ServerProcess(["--model", "builtin", "--cache-dir", str(cache)], log_path=logs / "a.log") as server:
        yield server


def queue_of(server: ServerProcess) -> str:
    return "appliance://" + server.url.removeprefix("http://")


def metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics", trust_env=False).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith((name + " ", name + "{")))


def runs_kept(url: str) -> dict[str, Any]:
    return dict(httpx.get(url + "/stream/runs", trust_env=False).json()["runs"])


def test_steady_ranks_consume_a_run_the_load_test_produces(
    locust: Any, appliance: ServerProcess, second: ServerProcess, model_info: dict[str, Any], tmp_path: Path
) -> None:
    urls = [appliance.url, second.url]
    produced = sum(metric(u, "eagle3_stream_produced_total") for u in urls)
    stream = ["--stream-queue", queue_of(appliance), "--stream-produce", "200", "--stream-urls", ",".join(urls)]
    stream += ["--stream-run-id", "locust-steady", "--stream-read-ahead", "2"]
    args = ["-f", "loadtest/steady.py", "-u", "2", "-r", "2", "-t", "10s", "--think-time", "0.1", *SHAPES, *stream]
    run = locust.run(args, appliance.url, tmp_path / "steady")
    assert run.returncode == 0, run.output[-4000:]
    stats = run.stats()
    row = stats[ROW]
    assert int(row["num_requests"]) > 0 and int(row["num_failures"]) == 0
    assert ("POST", "generate") not in stats and ("POST", "session") not in stats  # no /generate of their own
    report = run.report()
    assert report["verdict"]["passed"] and report["generate"]["requests"] == int(row["num_requests"])
    m = report["custom_metrics"]
    assert m["invalid"] == 0 and m["responses"] == int(row["num_requests"])
    assert m["supervision_bytes_per_token"] == 3 * model_info["hidden_size"] * 4 + DRAFT_VOCAB * 4 + 1 + 8 + 8
    after = sum(metric(u, "eagle3_stream_produced_total") for u in urls)
    assert m["responses"] <= after - produced <= 200  # what the ranks took was computed by the producer
    assert "locust-steady" not in runs_kept(appliance.url) | runs_kept(second.url)  # the run dropped at the end
    left = [line for line in _command_lines() if "locust-steady" in line]
    assert not left, left  # the producer ended with Locust


def test_capacity_search_over_a_run_the_user_produces(
    locust: Any, appliance: ServerProcess, second: ServerProcess, tmp_path: Path
) -> None:
    """``--tags capacity`` with stream ranks: the search steps the consumers and reports a count."""
    vocab = int(httpx.post(appliance.url + "/model_info", trust_env=False).json()["vocab_size"])
    ids, mask = vocab_mapping(vocab, DRAFT_VOCAB, seed=0, sort=True)
    torch.save({"selected_token_ids": ids, "selected_token_mask": mask}, tmp_path / "mapping.pt")
    g = torch.Generator().manual_seed(5)
    with (tmp_path / "rows.jsonl").open("w") as f:
        for _ in range(600):
            n = int(torch.randint(16, 64, (1,), generator=g))
            ids_ = torch.randint(0, vocab, (n,), generator=g).tolist()
            f.write(json.dumps({"input_ids": ids_, "loss_mask": [0] * (n // 4) + [1] * (n - n // 4)}) + "\n")
    run_id = f"locust-capacity-{time.time_ns() % 10**9}"
    command = [sys.executable, "-m", "eagle3_appliance", "produce", "--urls", f"{appliance.url},{second.url}"]
    command += ["--queue", queue_of(appliance), "--run-id", run_id, "--dataset", str(tmp_path / "rows.jsonl")]
    command += ["--batch-size", "2", "--vocab-mapping", str(tmp_path / "mapping.pt"), "--timeout", "100"]
    with (tmp_path / "producer.log").open("w") as log:
        producer = subprocess.Popen(command, cwd=REPO, env=subprocess_env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        steps = "--capacity-start-users 1 --capacity-step-users 1 --capacity-max-users 2"
        timing = "--capacity-step-time 4 --capacity-settle-time 1 --max-p95-ms 60000"
        stream = ["--stream-queue", queue_of(appliance), "--stream-run-id", run_id, "--think-time", "0.1"]
        args = ["-f", "loadtest/", "--tags", "capacity", "-t", "60s", *SHAPES, *stream, *f"{steps} {timing}".split()]
        run = locust.run(args, appliance.url, tmp_path / "capacity")
    finally:
        producer.kill()
        producer.wait(30)
        for url in (appliance.url, second.url):
            httpx.delete(f"{url}/stream/runs/{run_id}", trust_env=False)
    assert run.returncode == 0, run.output[-4000:]
    capacity = run.report()["capacity"]
    assert [step["users"] for step in capacity["steps"]] == [1, 2]
    assert all(step["passed"] and step["requests"] > 0 for step in capacity["steps"])
    assert capacity["capacity_users"] == 2
    assert int(run.stats()[ROW]["num_failures"]) == 0


def test_distributed_stream_ranks_consume_the_whole_run(
    locust: Any, appliance: ServerProcess, second: ServerProcess, tmp_path: Path
) -> None:
    """Master plus a worker (given --stream-queue too, so it loads the stream's libraries before joining):
    the run id the master made reaches the worker, whose ranks consume the run to its end."""
    port = free_port()
    prefix = tmp_path / "distributed"
    stream = ["--stream-queue", queue_of(appliance)]
    master_args = ["-f", "loadtest/steady.py", "--master", "--master-bind-port", str(port), "--expect-workers", "1"]
    master_args += ["-u", "2", "-r", "2", "-t", "40s", "--think-time", "0.05", *SHAPES, *stream]
    master_args += ["--stream-produce", "30", "--stream-urls", f"{appliance.url},{second.url}"]
    master = locust.popen(locust.command(master_args, appliance.url, prefix))
    worker_cmd = [sys.executable, "-m", "locust", "-f", "loadtest/steady.py", "--worker", "--master-port", str(port)]
    worker = locust.popen([*worker_cmd, *stream], quiet=True)
    try:
        output, _ = master.communicate(timeout=locust.hard_timeout_s)
        worker_code = worker.wait(timeout=60)
    finally:
        for proc in (master, worker):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    run = locust.result(master.returncode, output, prefix)
    assert run.returncode == 0, run.output[-4000:]
    assert worker_code == 0
    row = run.stats()[ROW]
    assert (int(row["num_requests"]), int(row["num_failures"])) == (30, 0)  # every batch of the run, once
    assert "producer exited with 0" in run.output  # the run closed: every sample acked
    assert run.report()["custom_metrics"]["responses"] == 30


def test_a_stream_queue_without_a_run_stops_the_run_before_it_starts(locust: Any, tmp_path: Path) -> None:
    args = ["-f", "loadtest/", "--stream-queue", "appliance://127.0.0.1:9", "-t", "5s"]
    run = locust.run(args, "http://127.0.0.1:9", tmp_path / "bad")
    assert run.returncode == 2
    assert "--stream-queue needs --stream-run-id" in run.output


def _command_lines() -> list[str]:
    lines = []
    for proc in Path("/proc").iterdir():
        try:
            lines.append((proc / "cmdline").read_bytes().replace(b"\0", b" ").decode())
        except OSError:  # not a process, or it ended meanwhile
            continue
    return lines
