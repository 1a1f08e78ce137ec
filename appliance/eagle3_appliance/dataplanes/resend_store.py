"""Answers kept for ``/data_plane/resend``: the last group transfer of each session, within a memory budget.

A group transfer that breaks is answered again over the wire from what is kept here, with no
second forward. The oldest answers are dropped first when ``--resend-budget-mb`` is exceeded; a
client whose answer was dropped gets 409 and sends its ``/generate`` again.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from eagle3_appliance.errors import ApplianceError
from eagle3_client import protocol

__all__ = ["NoStoredResult", "ResendStore", "StoredResult"]


class NoStoredResult(ApplianceError):
    """``/data_plane/resend`` for a transfer whose answer is not (or no longer) kept."""

    status_code = protocol.RESEND_CONFLICT_STATUS


@dataclass
class StoredResult:
    """A session's last group-transfer result, kept so that a broken transfer can be resent over the wire."""

    seq: int
    tensors: dict[str, torch.Tensor]
    headers: Mapping[str, str] | None = None  # of a wire answer of it (the encoding's name)
    nbytes: int = 0
    dropped: str | None = None  # why the tensors are gone, when they were dropped to stay within the budget
    kept_in: ResendStore | None = None

    def drop(self, reason: str) -> None:
        self.tensors = {}
        self.dropped = reason

    def close(self) -> None:
        """The session moved on (a newer result) or ended: give the memory back."""
        if self.kept_in is not None:
            self.kept_in.release(self)
        self.tensors = {}


class ResendStore:
    """Every session's last result, within ``--resend-budget-mb``: the oldest are dropped first.

    Why: a result is ~300 MB for a 2048-token batch of an 8B target and, on NCCL, lives in GPU
    memory; one per data-parallel rank would otherwise grow with the number of trainer ranks.
    A dropped result costs only a recompute, and only if that transfer breaks: the resend is
    refused with ``RESEND_CONFLICT_STATUS`` and the client sends its ``/generate`` again.
    Used from the event loop and, when a session ends, from a worker thread (so: a lock).
    """

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self.held_bytes = 0
        self.dropped = 0
        self._kept: OrderedDict[int, StoredResult] = OrderedDict()
        self._lock = threading.Lock()

    def keep(self, result: StoredResult) -> None:
        """Hold ``result`` (newest); drop the oldest ones until the held bytes fit the budget."""
        with self._lock:
            if result.nbytes > self.budget_bytes:
                result.drop(f"it alone is larger than --resend-budget-mb ({self._budget_text()})")
                self.dropped += 1
                return
            result.kept_in = self
            self._kept[id(result)] = result
            self.held_bytes += result.nbytes
            while self.held_bytes > self.budget_bytes:
                _, oldest = self._kept.popitem(last=False)
                self.held_bytes -= oldest.nbytes
                oldest.drop(f"newer answers filled --resend-budget-mb ({self._budget_text()})")
                self.dropped += 1

    def release(self, result: StoredResult) -> None:
        with self._lock:
            if self._kept.pop(id(result), None) is not None:
                self.held_bytes -= result.nbytes

    def _budget_text(self) -> str:
        return f"{self.budget_bytes / 2**20:g} MiB"

    def describe(self) -> dict[str, Any]:
        with self._lock:
            return {
                "budget_bytes": self.budget_bytes,
                "held_bytes": self.held_bytes,
                "held": len(self._kept),
                "dropped": self.dropped,
            }
