"""Helpers shared by the data-plane tests (inputs, comparisons, polling the server's status)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx
import torch

from eagle3_appliance.core.inputs import GenerateInputs, VocabMapping
from eagle3_appliance.model.supervision import in_process
from eagle3_appliance.model.target import Target
from eagle3_client import RemoteEagle3TargetModel, protocol
from eagle3_client.synthetic import random_batch, vocab_mapping

DRAFT_VOCAB = 1000  # nearly the whole built-in vocabulary: the largest answers the small model gives
Inputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def make_mapping(vocab: int, draft: int) -> VocabMapping:
    return VocabMapping(*vocab_mapping(vocab, min(draft, vocab), seed=7))


def inputs(reference: Target, batch: int, seq_len: int, seed: int) -> Inputs:
    return random_batch(reference.vocab_size, batch, seq_len, seed=seed)


def expected(reference: Target, mapping: VocabMapping, batch_inputs: Inputs) -> dict[str, torch.Tensor]:
    return {k: v.cpu() for k, v in in_process(reference, GenerateInputs(*batch_inputs), mapping).items()}


def assert_bit_exact(batch: Any, reference: dict[str, torch.Tensor]) -> None:
    for key, want in reference.items():
        got = getattr(batch, key).cpu()
        assert got.dtype == want.dtype, (key, got.dtype, want.dtype)
        assert got.shape == want.shape, (key, got.shape, want.shape)
        assert torch.equal(got, want), f"{key} differs"


def connect(url: str, mapping: VocabMapping, **options: Any) -> RemoteEagle3TargetModel:
    remote = RemoteEagle3TargetModel.from_urls([url], device="cpu", timeout=60, max_retries=1, **options)
    remote.set_vocab_mapping(mapping.selected_token_ids, mapping.selected_token_mask)
    return remote


def status(url: str, session_id: str | None = None) -> dict[str, Any]:
    headers = {protocol.SESSION_HEADER: session_id} if session_id else {}
    resp = httpx.get(url + protocol.path(protocol.EP_DATA_PLANE), headers=headers, timeout=10, trust_env=False)
    resp.raise_for_status()
    return resp.json()


def health(url: str) -> int:
    return httpx.get(url + protocol.path(protocol.EP_HEALTH), timeout=10, trust_env=False).status_code


def wait_for(condition: Callable[[], Any], what: str, limit: float = 60.0) -> Any:
    """Poll until ``condition()`` is truthy (bounded); returns its value. Not a timing assertion."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"gave up waiting for {what}")


def session_id(remote: RemoteEagle3TargetModel) -> str:
    sid = remote._servers[0].session_id
    assert sid is not None
    return sid
