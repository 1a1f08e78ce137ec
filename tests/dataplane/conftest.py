"""Fixtures for the data-plane tests: the built-in model, its in-process reference, real servers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from eagle3_appliance.core.inputs import VocabMapping
from eagle3_appliance.launch import ServerProcess
from eagle3_appliance.model.builtin_model import ensure_builtin_model
from eagle3_appliance.model.loading import load_target
from eagle3_appliance.model.target import Target
from eagle3_appliance.settings import Settings

from .helpers import DRAFT_VOCAB, make_mapping


@pytest.fixture(scope="session")
def dp_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("dp-cache")
    ensure_builtin_model(path)
    return path


@pytest.fixture(scope="session")
def reference(dp_cache: Path) -> Target:
    """The same model in this process: every remote answer must equal its supervision bit for bit."""
    return load_target(Settings(cache_dir=dp_cache))


@pytest.fixture(scope="session")
def mapping(reference: Target) -> VocabMapping:
    return make_mapping(reference.logits_size, DRAFT_VOCAB)


@pytest.fixture(scope="session")
def dp_server(dp_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One appliance process shared by the tests that leave it healthy."""
    log = tmp_path_factory.mktemp("dp-logs") / "server.log"
    with ServerProcess(["--cache-dir", str(dp_cache)], log_path=log) as proc:
        yield proc


@pytest.fixture(scope="module")
def fault_server(dp_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """An appliance with a short data-plane timeout and a port range, for tests that break transfers."""
    args = ["--cache-dir", str(dp_cache), "--data-plane-timeout", "3", "--data-plane-ports", "29650-29679"]
    with ServerProcess(args, log_path=tmp_path_factory.mktemp("fault-logs") / "server.log") as proc:
        yield proc
