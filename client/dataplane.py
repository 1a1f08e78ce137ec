"""Data planes: how one ``/generate`` answer's tensors get from a server to this process.

The backend calls :meth:`DataPlane.generate` and never looks at which plane it holds; a
negotiator picks one per server. This module has the HTTP-body plane (the upstream wire
fallback, always available); process-group planes implement the same interface.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from client import protocol
from client.control import ControlPlane
from client.encodings import detect_encoding, parse_encoding
from client.errors import ProtocolViolation

__all__ = ["DataPlane", "TransferStats", "WireDataPlane"]


@dataclass
class TransferStats:
    """What one server's data plane has moved, for ``transport_stats()``."""

    requests: int = 0
    bytes_received: int = 0


class DataPlane(ABC):
    """One server's transport for ``/generate`` answers."""

    name: str = "abstract"

    def __init__(self, control: ControlPlane) -> None:
        self.control = control
        self.stats = TransferStats()

    @abstractmethod
    def generate(self, payload: bytes) -> dict[str, torch.Tensor]:
        """POST the wire-encoded inputs and return the supervision tensors (on the CPU)."""

    def close(self) -> None:
        """Release the plane's resources (the control plane is closed by its owner)."""

    def __enter__(self) -> DataPlane:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_supervision(
    url: str, tensors: dict[str, torch.Tensor | None], encoding: str | None = None
) -> dict[str, torch.Tensor]:
    """Every key of the answer's encoding present and no None: anything else is a protocol violation.

    The encoding is recognised by the answer's keys, so any plane can move any encoding;
    ``encoding`` is what the server said it used (the wire plane's header), checked against them.
    """
    found = detect_encoding(tensors)
    if encoding is not None:
        try:
            said = parse_encoding(encoding)
        except ValueError as exc:
            raise ProtocolViolation(f"{url}/generate: {exc}") from None
        if said != found:
            raise ProtocolViolation(f"{url}/generate said it used encoding {encoding!r} but sent {sorted(tensors)}")
    missing = [k for k in found.keys if tensors.get(k) is None]
    if missing:
        raise ProtocolViolation(f"{url}/generate answer lacks {missing}; got {sorted(tensors)}")
    return {k: tensors[k] for k in found.keys}  # type: ignore[misc]


class WireDataPlane(DataPlane):
    """Tensors in the HTTP response body (upstream's fallback). Retried like any request."""

    name = "wire"

    def generate(self, payload: bytes) -> dict[str, torch.Tensor]:
        encoding, tensors = self.control.request(
            "POST",
            protocol.EP_GENERATE,
            lambda resp: (resp.headers.get(protocol.ENCODING_HEADER), self.control.read_wire(resp)),
            content=payload,
        )
        # No header: upstream's probs (an upstream server never sends one).
        result = check_supervision(self.control.url, tensors, encoding or protocol.ENCODING_PROBS)
        self.stats.requests += 1
        self.stats.bytes_received += sum(t.numel() * t.element_size() for t in result.values())
        return result
