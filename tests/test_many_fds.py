"""The client in a process with more than 1,024 open files, as in a real trainer, on every tier.

The client runs in a subprocess (``tests/many_fds_client.py``) so that this test runner's own
descriptor table is left alone. NCCL needs GPUs: ``tests/gpu/check_dataplanes.py`` covers it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from eagle3_appliance.launch import ServerProcess

REPO = Path(__file__).resolve().parent.parent
CLIENT = Path(__file__).resolve().parent / "many_fds_client.py"


@pytest.mark.parametrize("tier", ["wire", "gloo"])
def test_a_client_holding_over_1100_open_files_gets_exact_answers(
    server: ServerProcess, cache_dir: Path, tier: str
) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, str(CLIENT), server.url, tier, str(cache_dir)],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["held"] >= 1100 and seen["lowest_free_fd"] > 1100
    assert seen["exact"] == [True] * 4
    assert (seen["tier"], list(seen["bytes"]), seen["fallbacks"]) == (tier, [tier], 0)
