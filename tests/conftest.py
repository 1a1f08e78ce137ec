"""Shared fixtures: the built-in model in a per-session cache, an independent oracle, real servers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from eagle3_appliance.builtin_model import ensure_builtin_model
from eagle3_appliance.launch import ServerProcess
from tests.oracle import Oracle


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
def server(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One real appliance process on the built-in model, shared by the tests that only read."""
    log = tmp_path_factory.mktemp("logs") / "server.log"
    with ServerProcess(["--cache-dir", str(cache_dir), "--max-seq-len", "512"], log_path=log) as proc:
        yield proc


def random_mapping(vocab: int, draft: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An unsorted draft vocabulary and its mask, as the recipe builds them."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randperm(vocab, generator=g)[:draft]
    mask = torch.zeros(vocab, dtype=torch.bool)
    mask[ids] = True
    return ids, mask


def random_batch(
    vocab: int, batch: int, seq: int, seed: int, pad: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random tokens; with ``pad`` every odd row is right-padded (attention_mask zeros)."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (batch, seq), generator=g)
    attention_mask = torch.ones_like(input_ids)
    loss_mask = torch.randint(0, 2, (batch, seq), generator=g)
    if pad:
        for row in range(1, batch, 2):
            keep = max(1, seq - 1 - row % max(1, seq - 1))
            attention_mask[row, keep:] = 0
            loss_mask[row, keep:] = 0
    return input_ids, attention_mask, loss_mask
