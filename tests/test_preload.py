"""The suite's preloaded servers (tests/preload.py) behave as fresh ``eagle3-appliance serve`` processes."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import httpx
import pytest

from eagle3_appliance.launch import ServerProcess
from eagle3_client import RemoteEagle3TargetModel
from eagle3_client.synthetic import random_batch, vocab_mapping
from tests.oracle import Oracle, assert_bit_exact
from tests.preload import REPO, PreloadedProcess, PreloadingStarter, forks_exactly

SERVE = [sys.executable, "-m", "eagle3_appliance", "serve"]


@pytest.fixture
def starter(server_starter: PreloadingStarter | None) -> PreloadingStarter:
    if server_starter is None:
        pytest.skip("TEST_SERVERS_PRELOADED=0: every server is a fresh interpreter")
    return server_starter


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def test_a_forked_server_answers_exactly_as_a_fresh_one(
    starter: PreloadingStarter, cache_dir: Path, oracle: Oracle, tmp_path: Path
) -> None:
    args = ["--cache-dir", str(cache_dir), "--max-seq-len", "256"]
    # A variable read at start-up (not EAGLE3_*) makes the start a fresh interpreter.
    fresh = ServerProcess(args, env={"PRELOAD_TEST_FRESH": "1"}, log_path=tmp_path / "fresh.log")
    forked = ServerProcess(args, env={"EAGLE3_MAX_BATCH_TOKENS": "4096"}, log_path=tmp_path / "forked.log")
    with fresh, forked:
        assert isinstance(forked.proc, PreloadedProcess) and parent_of(forked.proc.pid) == starter.preloader.proc.pid
        assert fresh.proc is not None and parent_of(fresh.proc.pid) == os.getpid()
        infos = [httpx.post(s.url + "/model_info", trust_env=False, timeout=30).json() for s in (fresh, forked)]
        assert infos[0] == infos[1]
        ids, mask = vocab_mapping(1024, 256, seed=5)
        batch = random_batch(1024, 2, 24, seed=9)
        for s in (fresh, forked):
            with RemoteEagle3TargetModel.from_urls([s.url], data_plane="wire") as remote:
                remote.set_vocab_mapping(ids, mask)
                assert_bit_exact(remote.generate_batch(*batch), oracle.supervision(*batch, ids, mask))
    assert (fresh.proc.returncode, forked.proc.returncode) == (0, 0)
    for log in ("fresh.log", "forked.log"):
        text = (tmp_path / log).read_text()
        assert "serving {" in text and "Server Stopped" in text, log
    # Each runs with the environment it was given.
    assert "max_batch_tokens 4,096" in (tmp_path / "forked.log").read_text()
    assert "max_batch_tokens 4,096" not in (tmp_path / "fresh.log").read_text()


def test_a_killed_forked_server_reports_the_signal_as_popen_does(starter: PreloadingStarter, cache_dir: Path) -> None:
    server = ServerProcess(["--cache-dir", str(cache_dir)]).start()
    assert isinstance(server.proc, PreloadedProcess) and server.proc.poll() is None
    server.proc.send_signal(signal.SIGKILL)
    assert server.proc.wait(30) == -signal.SIGKILL
    assert server.proc.poll() == -signal.SIGKILL
    server.proc.send_signal(signal.SIGTERM)  # a no-op once it has ended, as with Popen
    assert server.stop() == -signal.SIGKILL


def test_a_forked_start_that_fails_exits_with_the_fresh_exit_code_and_message(
    starter: PreloadingStarter, cache_dir: Path, tmp_path: Path
) -> None:
    server = ServerProcess(["--cache-dir", str(cache_dir), "--aux-layer-ids", "0,2,8"], log_path=tmp_path / "s.log")
    with pytest.raises(RuntimeError, match="exited with 2 before answering"):
        server.start()
    assert isinstance(server.proc, PreloadedProcess)
    assert "aux layer id 8 is out of range for a model with 8 layers" in (tmp_path / "s.log").read_text()


@pytest.mark.parametrize(
    ("argv", "changes", "forks"),
    [
        (SERVE, {}, True),
        (SERVE, {"EAGLE3_MAX_SEQ_LEN": "64", "PYTEST_CURRENT_TEST": "x"}, True),
        (SERVE, {"PYTHONPATH": os.pathsep.join([str(REPO), ""])}, True),
        (SERVE, {"PYTHONPATH": os.pathsep.join([str(REPO), "/elsewhere"])}, False),  # e.g. a fake pynvml
        (SERVE, {"HF_HOME": "/tmp/hf"}, False),  # read when transformers is imported
        (SERVE, {"OMP_NUM_THREADS": "1"}, False),
        ([sys.executable, "-X", "dev", "-m", "eagle3_appliance", "serve"], {}, False),
        (["/usr/bin/env", sys.executable, "-m", "eagle3_appliance", "serve"], {}, False),
    ],
)
def test_only_starts_a_fresh_interpreter_would_run_identically_are_forked(
    argv: list[str], changes: dict[str, str], forks: bool
) -> None:
    base = {"PATH": "/usr/bin", "HOME": "/root"}
    assert forks_exactly(argv, {**base, **changes}, base) is forks
