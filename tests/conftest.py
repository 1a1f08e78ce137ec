"""Shared fixtures: the built-in model in a per-session cache, an independent oracle, real servers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from eagle3_appliance.launch import ServerProcess
from eagle3_appliance.model.builtin_model import ensure_builtin_model
from tests.ops_support import make_slow_model, offline_model_env
from tests.oracle import Oracle
from tests.preload import PreloadingStarter, preloaded_servers


@pytest.fixture(scope="session", autouse=True)
def server_starter(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PreloadingStarter | None]:
    """Servers fork from a process that imported the libraries once (tests/preload.py says when).

    Every process the session starts has transformers offline, with its caches in the session's
    folder: set here, before the preloader imports transformers (which reads them once).
    """
    with pytest.MonkeyPatch.context() as env:
        for key, value in offline_model_env(tmp_path_factory.mktemp("hf")).items():
            env.setenv(key, value)
        with preloaded_servers() as starter:
            yield starter


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cache")
    ensure_builtin_model(path)
    return path


@pytest.fixture(scope="session")
def model_dir(cache_dir: Path) -> Path:
    return ensure_builtin_model(cache_dir)


@pytest.fixture(scope="session")
def oracle(model_dir: Path) -> Oracle:
    return Oracle(model_dir)


@pytest.fixture(scope="session")
def slow_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The slow model (3 s on its marker token), built once: servers only read its folder."""
    return make_slow_model(tmp_path_factory.mktemp("slow") / "model", 3.0)


@pytest.fixture(scope="session")
def server(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One real appliance process on the built-in model, shared by the tests that only read."""
    log = tmp_path_factory.mktemp("logs") / "server.log"
    with ServerProcess(["--cache-dir", str(cache_dir), "--max-seq-len", "512"], log_path=log) as proc:
        yield proc
