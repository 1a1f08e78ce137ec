"""Fixtures of the NeMo AutoModel integration tests (shared with tests/conftest.py's)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from eagle3_appliance.launch import ServerProcess
from tests.redis_support import redis_server
from tests.vlm_support import APPLIANCE_ARGS, make_tiny_vlm


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


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Qwen2-VL of ``tests/vlm_support.py`` (random weights from a seed, nothing downloaded)."""
    return make_tiny_vlm(tmp_path_factory.mktemp("vlm") / "model")


@pytest.fixture(scope="module")
def vlm_server(vlm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One appliance on it, started as a user would (no family flags)."""
    log = tmp_path_factory.mktemp("vlm-logs") / "server.log"
    with ServerProcess(["--model", str(vlm_dir), *APPLIANCE_ARGS], log_path=log) as proc:
        yield proc


@pytest.fixture(scope="module")
def vlm_model(vlm_dir: Path) -> torch.nn.Module:
    """The same checkpoint in this process, float32 on the CPU as the appliance runs it: upstream's wrappers' model."""
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(vlm_dir, dtype=torch.float32).requires_grad_(False)


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server (Debian's), for the redis:// queue of the stream tests."""
    with redis_server(tmp_path_factory.mktemp("redis") / "redis.log") as url:
        yield url
