"""Back-pressure for ``/generate``: a bounded wait for the one model thread, and per-phase timing.

The model runs one forward at a time, so extra requests wait. Letting that queue grow
without bound only turns overload into client timeouts (and memory held by queued bodies);
instead, at most ``max_queue`` requests may wait behind the one computing, and the next
gets ``503`` with ``Retry-After`` estimated from how long recent forwards took. Our client
honours it; an upstream client treats it as any HTTP error.

A :class:`Ticket` follows one request through its phases, which the metrics split into
queue (waiting for the model thread), forward (target forward and projection), encode
(device-to-host copy and wire headers) and send (socket writes).

Usage::

    async with admission.admit() as ticket:           # 503 when full
        # on the model thread: ticket.begin_compute(); forward; ticket.forward_done(); ticket.end_compute()
        ticket.encoded(); await send(...); ticket.sent(nbytes)
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from eagle3_appliance.errors import Unavailable

__all__ = ["Admission", "Ticket", "retry_after_header"]

MAX_RETRY_AFTER_S = 60


def retry_after_header(seconds: float) -> dict[str, str]:
    """``Retry-After`` in whole seconds (HTTP allows no fractions), at least 1."""
    return {"Retry-After": str(max(1, min(MAX_RETRY_AFTER_S, math.ceil(seconds))))}


@dataclass
class Ticket:
    """Timestamps of one admitted request (``time.perf_counter`` seconds)."""

    admission: Admission
    admitted: float = field(default_factory=time.perf_counter)
    started: float | None = None  # the model thread picked it up
    forwarded: float | None = None  # forward and projection done (device synchronised)
    computed: float | None = None  # results on the host
    encoded_at: float | None = None  # wire headers built
    sent_at: float | None = None
    nbytes: int = 0

    def begin_compute(self) -> None:
        """On the model thread: the request leaves the queue."""
        self.admission._start(self)

    def forward_done(self) -> None:
        """On the model thread: forward and supervision done (device synchronised)."""
        self.forwarded = time.perf_counter()

    def end_compute(self) -> None:
        """On the model thread: the answer is ready for its transfer (also after an error)."""
        self.admission._finish_compute(self)

    def encoded(self) -> None:
        self.encoded_at = time.perf_counter()

    def sent(self, nbytes: int) -> None:
        self.sent_at = time.perf_counter()
        self.nbytes = nbytes

    def phases(self) -> dict[str, float]:
        """Seconds spent in each phase that completed: queue, forward, encode, send."""
        out: dict[str, float] = {}
        if self.started is None or self.started < 0:
            return out
        out["queue"] = self.started - self.admitted
        if self.forwarded is not None:
            out["forward"] = self.forwarded - self.started
        if self.forwarded is not None and self.computed is not None and self.encoded_at is not None:
            out["encode"] = (self.computed - self.forwarded) + max(0.0, self.encoded_at - self.computed)
        if self.encoded_at is not None and self.sent_at is not None:
            out["send"] = self.sent_at - self.encoded_at
        return out


class Admission:
    """Counts ``/generate`` requests waiting for and running on the model thread.

    Counters change on the event loop (admit, leave) and on the model thread (start,
    finish), so they sit behind a lock; readers (metrics, probes) only read integers.
    """

    def __init__(self, max_queue: int) -> None:
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        self.max_queue = max_queue
        self._lock = threading.Lock()
        self.queued = 0  # admitted, waiting for the model thread
        self.computing = 0  # on the model thread (forward, projection, device-to-host)
        self.inflight = 0  # admitted and not yet finished (any phase, sending included)
        self.refused = 0
        self._ewma_compute_s = 1.0  # a pessimistic start until the first forward is timed

    @property
    def compute_seconds(self) -> float:
        """Recent time of one request on the model thread (an exponential moving average)."""
        with self._lock:
            return self._ewma_compute_s

    def retry_after(self) -> dict[str, str]:
        """How long until a slot is likely free: the work ahead times the recent compute time."""
        with self._lock:
            ahead = self.queued + self.computing
            return retry_after_header(max(1, ahead) * self._ewma_compute_s)

    @asynccontextmanager
    async def admit(self) -> AsyncIterator[Ticket]:
        """Admit one request or raise 503; the ticket is released however the request ends."""
        with self._lock:
            full = self.queued + self.computing > self.max_queue
            if full:
                self.refused += 1
                ahead = self.queued + self.computing
                estimate = max(1, ahead) * self._ewma_compute_s
            else:
                self.queued += 1
                self.inflight += 1
        if full:
            raise Unavailable(
                f"the server is busy: {ahead} request(s) ahead and at most {self.max_queue} may wait",
                headers=retry_after_header(estimate),
            )
        ticket = Ticket(self)
        try:
            yield ticket
        finally:
            with self._lock:
                if ticket.started is None:  # never reached the model thread (timeout, cancel, error)
                    self.queued -= 1
                    ticket.started = -1.0  # a late start on the thread must not count it again
                self.inflight -= 1

    def _start(self, ticket: Ticket) -> None:
        with self._lock:
            if ticket.started is None:
                self.queued -= 1
            ticket.started = time.perf_counter()
            self.computing += 1

    def _finish_compute(self, ticket: Ticket) -> None:
        now = time.perf_counter()
        with self._lock:
            self.computing -= 1
            ticket.computed = now
            assert ticket.started is not None
            elapsed = now - ticket.started
            self._ewma_compute_s = 0.7 * self._ewma_compute_s + 0.3 * elapsed

    def idle(self) -> bool:
        with self._lock:
            return self.inflight == 0 and self.computing == 0
