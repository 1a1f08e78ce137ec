"""Long work shows progress: a bar on a terminal, log lines at a steady pace otherwise.

Loading a target logs tensors loaded of the total (per rank under tensor parallelism, in
tests/test_large_targets.py); ``validate`` and the benchmarks count their batches the same way.
"""

from __future__ import annotations

import io
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from eagle3_appliance.launch import ServerProcess
from eagle3_appliance.model.load_progress import loading_progress
from eagle3_appliance.progress import Progress, track


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _lines(caplog: pytest.LogCaptureFixture, name: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == name]


def test_log_lines_come_at_start_every_interval_and_at_the_end(caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("test.progress")
    clock = Clock()
    with caplog.at_level(logging.INFO, logger="test.progress"):
        with Progress("work", 10, unit="items", logger=log, interval_s=5.0, bar=False, clock=clock) as progress:
            for _ in range(10):
                clock.now += 1.5  # an item every 1.5 s: a line at 6 s and at 12 s
                progress.update()
    assert _lines(caplog, "test.progress") == [
        "work: 0/10 items (0 %), 0.0 s elapsed",
        "work: 4/10 items (40 %), 6.0 s elapsed, about 9 s left",
        "work: 8/10 items (80 %), 12.0 s elapsed, about 3 s left",
        "work: 10/10 items (100 %), 15.0 s elapsed, done",
    ]


def test_an_unfinished_run_says_it_stopped_and_an_open_total_counts(caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("test.progress")
    clock = Clock()
    with caplog.at_level(logging.INFO, logger="test.progress"):
        with pytest.raises(RuntimeError):
            for i in track(range(5), Progress("part", 5, logger=log, bar=False, clock=clock)):
                if i == 2:
                    raise RuntimeError("boom")
        Progress("open", None, logger=log, bar=False, clock=clock).close()
    assert _lines(caplog, "test.progress") == [
        "part: 0/5 steps (0 %), 0.0 s elapsed",
        "part: 2/5 steps (40 %), 0.0 s elapsed, stopped",
        "open: 0 steps, 0.0 s elapsed",
        "open: 0 steps, 0.0 s elapsed, done",
    ]


def test_a_terminal_gets_a_bar_and_no_log_lines(caplog: pytest.LogCaptureFixture) -> None:
    stream = io.StringIO()
    with caplog.at_level(logging.INFO, logger="test.progress"):
        with Progress("bar", 7, logger=logging.getLogger("test.progress"), stream=stream, bar=True) as progress:
            progress.update(7)
    assert "bar: 100%" in stream.getvalue() and "7/7" in stream.getvalue()
    assert _lines(caplog, "test.progress") == []


def _tensors(model_dir: Path) -> int:
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        return len(list(f.keys()))


def test_loading_under_a_rank_prefixes_its_lines(model_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    from transformers import AutoModelForCausalLM

    with caplog.at_level(logging.INFO, logger="eagle3_appliance.model.load_progress"):
        with loading_progress(model_dir, rank=1, interval_s=0.0):
            AutoModelForCausalLM.from_pretrained(model_dir)
    lines = _lines(caplog, "eagle3_appliance.model.load_progress")
    n = _tensors(model_dir)
    size = (model_dir / "model.safetensors").stat().st_size
    assert lines[0] == f"rank 1: loading weights from {model_dir}: 1 files, {size / 2**20:.1f} MiB"
    assert lines[1].startswith(f"rank 1: loading weights: 0/{n} tensors (0 %)")
    counts = [int(m.group(1)) for line in lines[2:] if (m := re.search(r"weights: (\d+)/", line))]
    assert counts == list(range(1, n + 1)) + [n]  # interval 0: a line per tensor, then the final one
    assert lines[-1].endswith("done")


def test_the_server_logs_its_load_progress(server: ServerProcess, model_dir: Path) -> None:
    assert server.log_path is not None
    log = server.log_path.read_text()
    n = _tensors(model_dir)
    assert f"loading weights: 0/{n} tensors (0 %)" in log
    assert re.search(rf"loading weights: {n}/{n} tensors \(100 %\), [0-9.]+ s elapsed, done", log), log[-2000:]


def test_validate_counts_its_batches_on_stderr(server: ServerProcess, cache_dir: Path) -> None:
    """Not a terminal: plain progress lines on stderr, the batch lines and the result on stdout."""
    args = ["validate", "--url", server.url, "--cache-dir", str(cache_dir), "--batches", "2", "--seq-len", "16"]
    proc = subprocess.run(
        [sys.executable, "-m", "eagle3_appliance", *args], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("/generate: ")]
    assert lines[0] == "/generate: 0/2 batches (0 %), 0.0 s elapsed"
    assert re.fullmatch(r"/generate: 2/2 batches \(100 %\), [0-9.]+ s elapsed, done", lines[-1]), lines
    assert [line.split()[:2] for line in proc.stdout.splitlines() if line.startswith("batch")] == [
        ["batch", "0"],
        ["batch", "1"],
    ]
