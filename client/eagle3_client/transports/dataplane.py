"""Data planes: how one ``/generate`` answer's tensors get from a server to this process.

The backend calls :meth:`DataPlane.fetch` and never looks at which plane it holds; a
negotiator (:mod:`eagle3_client.transports.negotiate`) picks one per server. This module has the HTTP-body
plane (the upstream wire fallback, always available); :mod:`eagle3_client.transports.group_plane` has the
process-group tiers (NCCL, gloo), which fall back to this one when a transfer breaks.

Planes are thread-safe: with pipelining (``max_in_flight_per_server``) several requests of one
process use a server's plane at once. The wire plane needs nothing for that (each answer has
its own HTTP exchange); the group plane orders its transfers (see its module).
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field

import httpx
import torch

from eagle3_client import protocol
from eagle3_client.capture import (
    EAGLE_KEYS,
    KEY_HIDDEN_STATES,
    KEY_INPUTS_EMBEDS,
    KEY_LAST_HIDDEN_STATES,
    KEY_LOGITS,
    VLM_KEYS,
)
from eagle3_client.encodings import detect_encoding, parse_encoding
from eagle3_client.errors import ProtocolViolation
from eagle3_client.transports.control import ControlPlane
from eagle3_client.transports.socketbody import RECV_INTO

__all__ = [
    "Answer",
    "DataPlane",
    "TransferStats",
    "WireAnswer",
    "WireDataPlane",
    "check_supervision",
    "mapping_version",
]


@dataclass
class Answer:
    """One checked ``/generate`` answer and the vocab-mapping version the server computed it under.

    ``mapping_version`` is None when the server did not name one (an upstream server).
    """

    tensors: dict[str, torch.Tensor]
    mapping_version: int | None = None


@dataclass
class WireAnswer:
    """A decoded wire body, the seconds its transfer took, and what its headers named."""

    tensors: dict[str, torch.Tensor | None]
    seconds: float
    encoding: str | None = None
    mapping_version: int | None = None


def mapping_version(url: str, headers: Mapping[str, str]) -> int | None:
    """The ``X-Eagle3-Mapping`` of an answer (None when absent); anything but an integer is a violation."""
    value = headers.get(protocol.MAPPING_VERSION_HEADER)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        header = protocol.MAPPING_VERSION_HEADER
        raise ProtocolViolation(f"{url}/generate: {header} {value!r} is not an integer") from None


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
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def record(self, tier: str, nbytes: int, seconds: float) -> None:
        with self._lock:  # pipelined requests of one server record from several threads
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
    def fetch(self, payload: bytes, *, retries: bool = True, headers: Mapping[str, str] | None = None) -> Answer:
        """POST the wire-encoded inputs; the checked answer (tensors on the CPU, or on the group's device).

        ``retries=False`` leaves retrying to the caller (a fleet fails over to another server
        instead), a timed-out answer excepted (:mod:`eagle3_client.transports.control`);
        ``headers`` ride along on the ``/generate`` request.
        """

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
    if KEY_HIDDEN_STATES in tensors or KEY_LAST_HIDDEN_STATES in tensors:  # another family's: no encoding applies
        return _check_capture_answer(url, tensors)
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
    return {**{k: tensors[k] for k in found.keys}, **_request_tensors(url, tensors, found.keys)}  # type: ignore[misc]


def _check_capture_answer(url: str, tensors: dict[str, torch.Tensor | None]) -> dict[str, torch.Tensor]:
    keys: tuple[str, ...] = (KEY_HIDDEN_STATES,)
    if KEY_HIDDEN_STATES not in tensors:  # EAGLE-1/2: the last hidden state and its logits
        keys = EAGLE_KEYS
    elif KEY_INPUTS_EMBEDS in tensors:  # ViSpec, MSD
        keys = VLM_KEYS
    elif KEY_LOGITS in tensors:  # DFlash with logits
        keys = (KEY_HIDDEN_STATES, KEY_LOGITS)
    elif KEY_LAST_HIDDEN_STATES in tensors:  # DSpark
        keys = (KEY_HIDDEN_STATES, KEY_LAST_HIDDEN_STATES)
    extra = set(tensors) - set(keys) - set(protocol.SAMPLE_INPUT_KEYS)
    if extra or any(tensors.get(k) is None for k in keys):
        raise ProtocolViolation(f"{url}/generate sent a capture answer with keys {sorted(tensors)}; expected {keys}")
    return {**{k: tensors[k] for k in keys}, **_request_tensors(url, tensors, keys)}  # type: ignore[misc]


def _request_tensors(
    url: str, tensors: dict[str, torch.Tensor | None], answer_keys: tuple[str, ...]
) -> dict[str, torch.Tensor]:
    """The request's tensors a stream claim's answer carries beside its supervision (none otherwise)."""
    found = {k: tensors[k] for k in protocol.SAMPLE_INPUT_KEYS if k in tensors and k not in answer_keys}
    if any(t is None for t in found.values()):
        raise ProtocolViolation(f"{url}/generate sent an empty entry among {sorted(found)}")
    return found  # type: ignore[return-value]


class WireDataPlane(DataPlane):
    """Tensors in the HTTP response body (upstream's fallback). Retried like any request."""

    name = "wire"

    def fetch(self, payload: bytes, *, retries: bool = True, headers: Mapping[str, str] | None = None) -> Answer:
        # RECV_INTO: the socket transport receives the body straight into the tensors. A stream
        # claim computes nothing: a claim that timed out (a frozen server) is not resent, its
        # caller looks for the sample where the producer moved it.
        claim = headers is not None and protocol.SAMPLE_HEADER in headers
        answer = self.control.request(
            "POST",
            protocol.EP_GENERATE,
            self.read_timed,
            content=payload,
            headers=headers,
            retries=retries,
            retry_lost=not claim,
            extensions={RECV_INTO: True},
        )
        return self.accept(answer)

    def read_timed(self, resp: httpx.Response) -> WireAnswer:
        """Read a wire answer, timing the body only (the headers arrive once the forward is done)."""
        version = mapping_version(self.control.url, resp.headers)
        start = time.perf_counter()
        tensors = self.control.read_wire(resp)
        return WireAnswer(tensors, time.perf_counter() - start, resp.headers.get(protocol.ENCODING_HEADER), version)

    def accept(self, answer: WireAnswer) -> Answer:
        """Check a decoded wire answer against the encoding it names, and count it."""
        # No header: upstream's probs (an upstream server never sends one).
        result = check_supervision(self.control.url, answer.tensors, answer.encoding or protocol.ENCODING_PROBS)
        self.stats.record(self.name, sum(t.numel() * t.element_size() for t in result.values()), answer.seconds)
        return Answer(result, answer.mapping_version)
