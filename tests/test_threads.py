"""The CPU threads of the forwards: they sleep at operator barriers, and ``--intra-op-threads`` sets their number.

Why it matters (docs/loadtests.md): a pool of spinning threads as wide as the machine stalls at
every operator when one of them is descheduled by the event loop, a load generator or another job.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from eagle3_appliance.launch import ServerProcess
from eagle3_appliance.model.threads import WAIT_POLICY, intra_op_threads, quiet_openmp_waits
from eagle3_appliance.settings import Settings
from tests.ops_support import metric, scrape


def test_serve_asks_for_sleeping_waits_before_torch_loads() -> None:
    environ: dict[str, str] = {}
    assert quiet_openmp_waits(environ, torch_loaded=False) == "PASSIVE"
    assert environ == {WAIT_POLICY: "PASSIVE"}


def test_a_policy_the_user_set_is_kept() -> None:
    environ = {WAIT_POLICY: "ACTIVE"}
    assert quiet_openmp_waits(environ, torch_loaded=False) == "ACTIVE"
    assert environ == {WAIT_POLICY: "ACTIVE"}


def test_once_torch_is_loaded_nothing_is_claimed() -> None:
    environ: dict[str, str] = {}
    assert quiet_openmp_waits(environ, torch_loaded=True) is None  # the runtime has read its environment
    assert environ == {}


@pytest.mark.parametrize(
    ("requested", "device", "world", "usable", "expected"),
    [
        (0, "cpu", 1, 2, None),  # torch's default: the bits of the in-process target on its default
        (0, "cuda", 1, 16, None),
        (0, "cpu", 2, 9, 4),  # tensor-parallel ranks on the CPU share the usable CPUs
        (0, "cpu", 4, 2, 1),  # at least one each
        (0, "cuda", 2, 16, None),
        (3, "cpu", 1, 2, 3),  # an explicit count is used as given
        (6, "cuda", 2, 16, 6),
    ],
)
def test_the_thread_count_rule(requested: int, device: str, world: int, usable: int, expected: int | None) -> None:
    assert intra_op_threads(requested, device, world, usable=usable) == expected


def test_the_option_is_declared_with_torchs_default() -> None:
    assert Settings().intra_op_threads == 0
    with pytest.raises(ValueError, match="--intra-op-threads must be at least 0"):
        Settings(intra_op_threads=-1)


def test_a_server_says_what_its_forwards_get(server: ServerProcess) -> None:
    threads = metric(scrape(server.url), "eagle3_intra_op_threads")
    assert threads >= 1
    assert server.log_path is not None
    log = server.log_path.read_text()
    assert f"intra-op threads: {threads:g} per forward" in log
    assert "OpenMP wait policy: " in log


@pytest.fixture(scope="module")
def three_threads(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("threads") / "server.log"
    with ServerProcess(["--cache-dir", str(cache_dir), "--intra-op-threads", "3"], log_path=log) as proc:
        yield proc


def test_an_explicit_count_is_what_the_model_thread_uses(three_threads: ServerProcess) -> None:
    assert metric(scrape(three_threads.url), "eagle3_intra_op_threads") == 3


def test_a_fresh_server_runs_openmp_with_sleeping_waits(cache_dir: Path, tmp_path: Path) -> None:
    # OMP_DISPLAY_ENV makes the runtime print what it read when it loads (and, not being a
    # run-time variable, makes the test starter use a fresh interpreter rather than a fork).
    if WAIT_POLICY in os.environ:
        pytest.skip(f"{WAIT_POLICY} is set in this environment, and serve keeps it")
    log = tmp_path / "server.log"
    with ServerProcess(["--cache-dir", str(cache_dir)], env={"OMP_DISPLAY_ENV": "VERBOSE"}, log_path=log):
        pass
    text = log.read_text()
    if "GOMP_SPINCOUNT" not in text:
        pytest.skip("torch's OpenMP runtime here is not GNU OpenMP")
    assert "GOMP_SPINCOUNT = '0'" in text  # passive: no spinning at all (the runtime's default spins 300000 times)
