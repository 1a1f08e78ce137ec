"""Fixtures of the NeMo AutoModel integration tests (shared with tests/conftest.py's)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from eagle3_appliance.launch import ServerProcess


@pytest.fixture(scope="session")
def appliances(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[ServerProcess]]:
    """Two real appliance processes on the built-in model (two, for prefetch depth 2)."""
    logs = tmp_path_factory.mktemp("appliances")
    procs = [
        ServerProcess(["--cache-dir", str(cache_dir), "--device", "cpu"], log_path=logs / f"appliance{i}.log")
        for i in (0, 1)
    ]
    try:
        for proc in procs:
            proc.start()
        yield procs
    finally:
        for proc in procs:
            proc.stop()
