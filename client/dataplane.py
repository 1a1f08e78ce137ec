"""Data planes: how one ``/generate`` answer's tensors get from a server to this process.

The backend calls :meth:`DataPlane.generate` and never looks at which plane it holds; a
negotiator (:mod:`client.negotiate`) picks one per server. This module has the HTTP-body
plane (the upstream wire fallback, always available); :mod:`client.group_plane` has the
process-group tiers (NCCL, gloo), which fall back to this one when a transfer breaks.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch

from client import protocol
from client.control import ControlPlane
from client.errors import ProtocolViolation

__all__ = ["DataPlane", "TransferStats", "WireDataPlane", "check_supervision"]


@dataclass
class TransferStats:
    """What one server's data plane has moved, for ``transport_stats()``.

    ``bytes`` and ``seconds`` are per tier; ``seconds`` counts only the transfer (from the
    answer's first byte to its last tensor), not the forward before it.
    """

    requests: int = 0
    bytes: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    fallbacks: int = 0
    reupgrades: int = 0

    def record(self, tier: str, nbytes: int, seconds: float) -> None:
        self.requests += 1
        self.bytes[tier] = self.bytes.get(tier, 0) + nbytes
        self.seconds[tier] = self.seconds.get(tier, 0.0) + seconds

    @property
    def bytes_received(self) -> int:
        return sum(self.bytes.values())


class DataPlane(ABC):
    """One server's transport for ``/generate`` answers."""

    name: str = "abstract"

    def __init__(self, control: ControlPlane, stats: TransferStats | None = None) -> None:
        self.control = control
        self.stats = TransferStats() if stats is None else stats

    @property
    def tier(self) -> str:
        """The tier moving tensors right now (``"nccl"``, ``"gloo"`` or ``"wire"``)."""
        return self.name

    @abstractmethod
    def generate(self, payload: bytes) -> dict[str, torch.Tensor]:
        """POST the wire-encoded inputs and return the supervision tensors (on the CPU)."""

    def close(self) -> None:
        """Release the plane's resources (the control plane is closed by its owner)."""

    def __enter__(self) -> DataPlane:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_supervision(url: str, tensors: dict[str, torch.Tensor | None]) -> dict[str, torch.Tensor]:
    """Every supervision key present and no None: anything else is a protocol violation."""
    missing = [k for k in protocol.SUPERVISION_KEYS if tensors.get(k) is None]
    if missing:
        raise ProtocolViolation(f"{url}/generate answer lacks {missing}; got {sorted(tensors)}")
    return {k: tensors[k] for k in protocol.SUPERVISION_KEYS}  # type: ignore[misc]


class WireDataPlane(DataPlane):
    """Tensors in the HTTP response body (upstream's fallback). Retried like any request."""

    name = "wire"

    def generate(self, payload: bytes) -> dict[str, torch.Tensor]:
        tensors, seconds = self.control.request("POST", protocol.EP_GENERATE, self.read_timed, content=payload)
        return self.accept(tensors, seconds)

    def read_timed(self, resp: object) -> tuple[dict[str, torch.Tensor | None], float]:
        """Read a wire answer, timing the body only (the headers arrive once the forward is done)."""
        start = time.perf_counter()
        tensors = self.control.read_wire(resp)  # type: ignore[arg-type]
        return tensors, time.perf_counter() - start

    def accept(self, tensors: dict[str, torch.Tensor | None], seconds: float) -> dict[str, torch.Tensor]:
        """Check a decoded wire answer and count it."""
        result = check_supervision(self.control.url, tensors)
        self.stats.record(self.name, sum(t.numel() * t.element_size() for t in result.values()), seconds)
        return result
