"""Fixtures for the load-test tests: an appliance subprocess and a way to run Locust against it.

This session never imports locust (it monkey-patches the interpreter with gevent): every
Locust run is a ``python -m locust`` subprocess, bounded by ``-t`` or by the capacity
search's own steps, plus a hard timeout here.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from eagle3_appliance.launch import ServerProcess, free_port

REPO = Path(__file__).resolve().parents[2]
BROKEN_SERVER = Path(__file__).with_name("broken_server.py")
# A run's -t plus Locust's start-up (imports torch) and shutdown, with a wide margin.
HARD_TIMEOUT_S = 120


def subprocess_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOCUST_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def locust_command(args: Sequence[str], host: str, prefix: Path | None) -> list[str]:
    cmd = [sys.executable, "-m", "locust", "--headless", "--only-summary", "--host", host, *args]
    if prefix is not None:
        cmd += ["--csv", str(prefix), "--json-file", f"{prefix}_locust"]  # Locust adds ".json"
    return cmd


@dataclass
class LocustRun:
    """One finished Locust process and the files it wrote."""

    returncode: int
    output: str
    prefix: Path

    def stats(self) -> dict[tuple[str, str], dict[str, Any]]:
        """Final per-row stats from Locust's JSON file, keyed by (type, name).

        Not from ``<prefix>_stats.csv``: Locust rewrites that file once a second and not at
        shutdown, so its last version can miss the final second (and late worker reports).
        """
        return {(e["method"], e["name"]): e for e in self.locust_json()}

    def csv_rows(self) -> dict[tuple[str, str], dict[str, str]]:
        with open(f"{self.prefix}_stats.csv", newline="") as f:
            return {(r["Type"], r["Name"]): r for r in csv.DictReader(f) if r["Name"] != "Aggregated"}

    def report(self) -> dict[str, Any]:
        return json.loads(Path(f"{self.prefix}_eagle3.json").read_text())

    def locust_json(self) -> list[dict[str, Any]]:
        return json.loads(Path(f"{self.prefix}_locust.json").read_text())


class Locust:
    """Start ``python -m locust`` processes from the repository root (the ``locust`` fixture)."""

    repo = REPO
    hard_timeout_s = HARD_TIMEOUT_S

    def command(self, args: Sequence[str], host: str, prefix: Path | None) -> list[str]:
        return locust_command(args, host, prefix)

    def popen(self, cmd: Sequence[str], *, quiet: bool = False) -> subprocess.Popen[str]:
        out = subprocess.DEVNULL if quiet else subprocess.PIPE
        return subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=out, stderr=subprocess.STDOUT, text=True)

    def result(self, returncode: int, output: str, prefix: Path) -> LocustRun:
        return LocustRun(returncode, output, prefix)

    def run(self, args: Sequence[str], host: str, prefix: Path) -> LocustRun:
        proc = subprocess.run(
            locust_command(args, host, prefix),
            cwd=REPO,
            env=subprocess_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=HARD_TIMEOUT_S,
        )
        return self.result(proc.returncode, proc.stdout, prefix)


@pytest.fixture(scope="session")
def locust() -> Locust:
    return Locust()


@pytest.fixture(scope="session")
def appliance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The CPU appliance on the built-in model, shared by the tests of this session."""
    logs = tmp_path_factory.mktemp("appliance")
    cache = tmp_path_factory.mktemp("cache")
    server = ServerProcess(["--model", "builtin", "--cache-dir", str(cache)], log_path=logs / "eagle3_appliance.log")
    with server:
        yield server


@pytest.fixture(scope="session")
def model_info(appliance: ServerProcess) -> dict[str, Any]:
    return httpx.post(appliance.url + "/model_info", trust_env=False).json()


@pytest.fixture(scope="session")
def broken_server() -> Iterator[str]:
    """``broken_server.py``; yields its URL (append ``/<mode>`` to pick what it breaks)."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(BROKEN_SERVER), "--port", str(port)],
        env=subprocess_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, "broken_server.py exited early"
            try:
                if httpx.get(url + "/health", timeout=1.0, trust_env=False).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "broken_server.py did not answer /health"
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
