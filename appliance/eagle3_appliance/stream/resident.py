"""Answers kept resident for runs' streams, on the appliance that computed them, within two watermarks.

A producer asks for a sample's answer ahead of demand (``/stream/produce``); the answer stays
here (GPU memory on a GPU target) until a trainer has consumed it (its lease acked: the
consumer's queue calls ``/stream/release``), or its run ends (``DELETE /stream/runs/<run>``).
Nothing else drops an answer: a trainer that dies holding a lease has its sample delivered to
another trainer, which claims the same answer from here.

Memory is bounded by ``--stream-memory-mb`` (the high watermark): a computation is admitted
only if the resident answers, those being computed and its own (estimated from its shape,
never below its real size) fit under it. A new sample must leave a reserve free: the larger of
``--stream-reserve`` of it and two of the largest answers seen (at most half of it; none with
``--stream-reserve 0``). That room
is for *priority* samples (``X-Eagle3-Priority``: a sample whose appliance
was lost and which a trainer holds a lease on, waiting for it while every appliance may be full
of the samples queued behind it; or the next sample of an in-order run). Once a new sample is refused,
producers stay refused until the resident answers fall below the low watermark
(``--stream-low-watermark``), so that a producer sitting at the watermark does not alternate
between one answer in and one out.
Used from the event loop and the model thread: one lock.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from eagle3_appliance.errors import ApplianceError, Unavailable
from eagle3_client import protocol

__all__ = ["AnswerMismatch", "KeptAnswer", "NoKeptAnswer", "Reservation", "ResidentAnswers", "StreamFull"]


class NoKeptAnswer(ApplianceError):
    """A claim or release names a run or sample this appliance keeps no answer for."""

    status_code = 404


class AnswerMismatch(ApplianceError):
    """A claim (or a second produce) from a session whose capture or encoding is not the kept answer's."""

    status_code = 409


class StreamFull(Unavailable):
    """The resident answers are at the high watermark: the producer waits or goes to another appliance."""


@dataclass
class KeptAnswer:
    """One sample's answer and what a claim needs to send it: tensors, headers, the reference to announce it."""

    run_id: str
    sample_id: str
    tensors: dict[str, torch.Tensor]  # the supervision, then the request's tensors (protocol.SAMPLE_INPUT_KEYS)
    headers: dict[str, str]  # of a wire answer of it (the encoding's name)
    capture: str  # Capture.spec() of the session that produced it
    encoding: str
    ref: protocol.StreamRef
    nbytes: int
    claims: int = 0


@dataclass
class Reservation:
    """Room held under the high watermark for one answer being computed."""

    run_id: str
    sample_id: str
    nbytes: int
    done: bool = False


@dataclass
class _Run:
    answers: OrderedDict[str, KeptAnswer] = field(default_factory=OrderedDict)
    nbytes: int = 0


class ResidentAnswers:
    """Every run's kept answers on this appliance, within ``high_bytes`` (see the module docstring)."""

    def __init__(self, high_bytes: int, low_bytes: int, metrics: Any = None, reserve_bytes: int = 0) -> None:
        if not 0 <= low_bytes <= high_bytes - reserve_bytes:
            raise ValueError(
                f"the low watermark ({low_bytes}) must be in [0, high watermark {high_bytes} - reserve {reserve_bytes}]"
            )
        self.high_bytes = high_bytes
        self._low_bytes = low_bytes
        self.reserve_bytes = reserve_bytes
        self._largest = 0  # the largest answer reserved so far: the reserve holds two of them
        self.metrics = metrics  # eagle3_appliance.ops.metrics.Metrics (its stream_* series), or None
        self.paused = False
        self._runs: dict[str, _Run] = {}
        self._reserved = 0
        self._resident = 0
        self._count = 0
        self._lock = threading.Lock()
        if metrics is not None:
            metrics.stream_watermark.labels("high").set(high_bytes)
            metrics.stream_watermark.labels("low").set_function(lambda: self.low_bytes)
            metrics.stream_resident.labels("bytes").set_function(lambda: self._resident)
            metrics.stream_resident.labels("samples").set_function(lambda: self._count)
            metrics.stream_paused.set_function(lambda: float(self.paused))

    # -- producing ----------------------------------------------------------------------

    def reserve(
        self, run_id: str, sample_id: str, nbytes: int, retry_after: dict[str, str], *, priority: bool = False
    ) -> Reservation:
        """Room for one answer of about ``nbytes`` (never less than its real size), or :class:`StreamFull`.

        ``priority``: the reserve may be used, and the pause does not apply (module docstring).
        """
        with self._lock:
            if self.high_bytes == 0:
                raise StreamFull(
                    "this server keeps no stream answers (--stream-memory-mb 0)",
                    headers={**retry_after, protocol.STREAM_FULL_HEADER: "disabled"},
                )
            if nbytes > self.high_bytes:
                raise StreamFull(
                    f"one answer of this batch ({_mib(nbytes)}) is larger than --stream-memory-mb "
                    f"({_mib(self.high_bytes)}): send smaller batches or raise it",
                    headers={**retry_after, protocol.STREAM_FULL_HEADER: "too-large"},
                )
            held = self._resident + self._reserved
            if priority and held + nbytes <= self.high_bytes:
                self._reserved += nbytes
                return Reservation(run_id, sample_id, nbytes)
            self._largest = max(self._largest, nbytes)
            if self.paused and held <= self.low_bytes:
                self.paused = False
            if self.paused or held + nbytes > self.high_bytes - self.reserve_now:
                self.paused = True
                if self.metrics is not None:
                    self.metrics.stream_refused.inc()
                raise StreamFull(
                    f"resident stream answers are at the high watermark ({_mib(held)} held or being computed, "
                    f"{_mib(self.high_bytes)} high, resuming below {_mib(self.low_bytes)}): the producer waits "
                    "until trainers acknowledge samples",
                    headers={**retry_after, protocol.STREAM_FULL_HEADER: "high"},
                )
            self._reserved += nbytes
            return Reservation(run_id, sample_id, nbytes)

    def cancel(self, reservation: Reservation) -> None:
        """The computation failed: give its room back."""
        with self._lock:
            if not reservation.done:
                reservation.done = True
                self._reserved -= reservation.nbytes
                self._resume()

    def keep(self, reservation: Reservation, answer: KeptAnswer) -> KeptAnswer:
        """Hold ``answer`` in ``reservation``'s room; the one already kept for that sample if there is one."""
        with self._lock:
            if not reservation.done:
                reservation.done = True
                self._reserved -= reservation.nbytes
            run = self._runs.setdefault(answer.run_id, _Run())
            kept = run.answers.get(answer.sample_id)
            if kept is not None:  # two producers raced on one sample: the first answer stays
                return kept
            run.answers[answer.sample_id] = answer
            run.nbytes += answer.nbytes
            self._resident += answer.nbytes
            self._count += 1
        if self.metrics is not None:
            self.metrics.stream_produced.inc()
        return answer

    # -- claiming and dropping ----------------------------------------------------------

    def get(self, run_id: str, sample_id: str, check: Callable[[KeptAnswer], None] | None = None) -> KeptAnswer:
        """The kept answer of one sample, counted as claimed; :class:`NoKeptAnswer` naming what is missing.

        ``check`` may refuse it (raise) before it is counted: a claimant that may not have it.
        """
        with self._lock:
            run = self._runs.get(run_id)
            kept = None if run is None else run.answers.get(sample_id)
            if kept is None:
                raise NoKeptAnswer(self._missing(run_id, sample_id, run))
            if check is not None:
                check(kept)
            kept.claims += 1
        if self.metrics is not None:
            self.metrics.stream_claimed.inc()
        return kept

    def peek(self, run_id: str, sample_id: str) -> KeptAnswer | None:
        """The kept answer of one sample, if any (not a claim)."""
        with self._lock:
            run = self._runs.get(run_id)
            return None if run is None else run.answers.get(sample_id)

    def release(self, run_id: str, sample_ids: list[str]) -> int:
        """Drop these samples' answers (their leases were acked); how many were kept. Unknown ones are ignored:
        a release is repeated by whoever is not sure it arrived."""
        dropped = 0
        with self._lock:
            run = self._runs.get(run_id)
            if run is None:
                return 0
            for sample_id in sample_ids:
                kept = run.answers.pop(sample_id, None)
                if kept is not None:
                    dropped += 1
                    self._forget(run, kept)
            if not run.answers:
                del self._runs[run_id]
            self._resume()
        if self.metrics is not None and dropped:
            self.metrics.stream_released.labels("acked").inc(dropped)
        return dropped

    def end_run(self, run_id: str) -> int:
        """Drop every answer of ``run_id`` (the run ended); how many."""
        with self._lock:
            run = self._runs.pop(run_id, None)
            if run is None:
                return 0
            for kept in run.answers.values():
                self._forget(run, kept)
            dropped = len(run.answers)
            self._resume()
        if self.metrics is not None:
            self.metrics.stream_released.labels("run_ended").inc(dropped)
        return dropped

    @property
    def reserve_now(self) -> int:
        """The room new samples leave for priority ones (module docstring)."""
        if self.reserve_bytes == 0:
            return 0  # no reserve asked for (--stream-reserve 0)
        return min(self.high_bytes // 2, max(self.reserve_bytes, 2 * self._largest))

    @property
    def low_bytes(self) -> int:
        """The low watermark, never above what new samples may fill (so that producers can resume)."""
        return min(self._low_bytes, self.high_bytes - self.reserve_now)

    def _resume(self) -> None:
        """Producers are admitted again once answers are dropped to the low watermark (the lock is held):
        said at once (``paused``, the gauge, ``/stream/runs``), not at the next producer's try."""
        if self.paused and self._resident + self._reserved <= self.low_bytes:
            self.paused = False

    def _forget(self, run: _Run, kept: KeptAnswer) -> None:
        run.nbytes -= kept.nbytes
        self._resident -= kept.nbytes
        self._count -= 1

    def _missing(self, run_id: str, sample_id: str, run: _Run | None) -> str:
        if run is None:
            return (
                f"this appliance keeps no answers of run {run_id!r}: it was never produced here, every sample was "
                "acked, the run ended, or the appliance restarted (the producer computes such samples again)"
            )
        return (
            f"this appliance keeps no answer for sample {sample_id!r} of run {run_id!r} ({len(run.answers)} kept): "
            "it was acked, never produced here, or the appliance restarted"
        )

    # -- reading ------------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        """Totals and one line per run, for ``GET /stream/runs``."""
        with self._lock:
            return {
                "resident_bytes": self._resident,
                "reserved_bytes": self._reserved,
                "resident_samples": self._count,
                "high_watermark_bytes": self.high_bytes,
                "low_watermark_bytes": self.low_bytes,
                "reserve_bytes": self.reserve_now,
                "paused": self.paused,
                "runs": {
                    run_id: {"samples": len(run.answers), "bytes": run.nbytes} for run_id, run in self._runs.items()
                },
            }

    def samples(self, run_id: str) -> list[str]:
        """The sample ids of ``run_id`` kept here, oldest first; :class:`NoKeptAnswer` for an unknown run."""
        with self._lock:
            run = self._runs.get(run_id)
            if run is None:
                raise NoKeptAnswer(self._missing(run_id, "", None))
            return list(run.answers)


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f} MiB"
