"""The run queues an appliance hosts (``appliance://``): plain state behind one lock.

The semantics are the contract's (:mod:`eagle3_client.streaming.queues`); this is its in-memory
implementation, which the HTTP routes (:mod:`eagle3_appliance.serving.queue_routes`) expose.
Every refusal is an :class:`~eagle3_appliance.errors.ApplianceError` whose class name is the
client's error class name (the JSON error body's ``"type"``), so the client raises the same
error a Redis-backed queue raises.

Leases expire on :func:`time.monotonic`: a heap of (deadline, sample, lease) finds the expired
ones without scanning the run (an entry whose lease is gone by then is skipped). Counts and
events go to a :class:`QueueObserver` (the server's metrics), under the lock, as they change.
"""

from __future__ import annotations

import bisect
import heapq
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from eagle3_appliance.errors import Conflict, InvalidRequest, NotFound
from eagle3_client.protocol import (
    MAX_STREAM_IDS_PER_REQUEST,
    LeaseJSON,
    RunDescription,
    RunStateJSON,
    SampleStatus,
    StreamRef,
)
from eagle3_client.quoting import quote

__all__ = [
    "MAX_RUNS",
    "LeaseNotHeld",
    "QueueHostFull",
    "QueueObserver",
    "RunMismatch",
    "RunQueues",
    "UnknownRun",
    "UnknownSample",
]

# Runs one appliance hosts at once: each costs memory and metric series; a producer ends its run.
MAX_RUNS = 64
PENDING, LEASED, ACKED = "pending", "leased", "acked"
STATES = (PENDING, LEASED, ACKED)
EVENTS = ("redelivered", "recomputed", "empty", "refused")


class UnknownRun(NotFound):
    """No such run on this queue host."""


class UnknownSample(NotFound):
    """The run has no such sample."""


class RunMismatch(Conflict):
    """Another description of the run, a reference of another run or model, or a total that disagrees."""


class LeaseNotHeld(Conflict):
    """An ack or fail under a lease the sample is not held under now."""


class QueueHostFull(Conflict):
    """The host already holds :data:`MAX_RUNS` runs."""


class QueueObserver:
    """Told every change of a run's counts and every event (the server's metrics); no-ops here."""

    def counts(self, run_id: str, pending: int, leased: int, acked: int) -> None:
        pass

    def event(self, run_id: str, event: str) -> None:
        pass

    def ended(self, run_id: str) -> None:
        pass


@dataclass
class _Sample:
    ref: StreamRef
    state: str = PENDING
    deliveries: int = 0
    lease_id: str = ""  # the lease it is (or, acked, was last) held under
    deadline: float = 0.0


@dataclass
class _Run:
    run_id: str
    description: RunDescription
    samples: dict[str, _Sample] = field(default_factory=dict)
    fifo: deque[str] = field(default_factory=deque)  # pending ids, oldest first
    deadlines: list[tuple[float, str, str]] = field(default_factory=list)  # heap of (deadline, sample, lease)
    sorted_ids: list[str] | None = None  # samples() pages; None once a new sample makes it stale
    total: int | None = None
    pending: int = 0
    leased: int = 0
    acked: int = 0
    redelivered: int = 0
    recomputed: int = 0

    @property
    def closed(self) -> bool:
        return self.total is not None and self.acked == self.total

    def state(self) -> RunStateJSON:
        return RunStateJSON(
            run_id=self.run_id,
            description=self.description,
            sealed=self.total is not None,
            total=self.total,
            known=len(self.samples),
            pending=self.pending,
            leased=self.leased,
            acked=self.acked,
            redelivered=self.redelivered,
            recomputed=self.recomputed,
            closed=self.closed,
        )


class RunQueues:
    """Every run this appliance hosts, created by the first ``open`` with a description."""

    def __init__(self, observer: QueueObserver | None = None, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._observer = observer or QueueObserver()
        self._clock = clock
        self._lock = threading.Lock()
        self._runs: dict[str, _Run] = {}

    def runs(self) -> list[str]:
        with self._lock:
            return sorted(self._runs)

    def open(self, run_id: str, description: RunDescription | None) -> RunDescription:
        with self._lock:
            run = self._runs.get(run_id)
            if run is None:
                if description is None:
                    raise _unknown_run(run_id)
                if len(self._runs) >= MAX_RUNS:
                    raise QueueHostFull(
                        f"this appliance already hosts {MAX_RUNS} run queues; end a finished run "
                        f"(POST /queue/<run>/end) or host run {quote(run_id)} elsewhere"
                    )
                run = self._runs[run_id] = _Run(run_id, description)
                self._counts(run)
                return description
            if description is not None and (diffs := run.description.differences(description)):
                raise RunMismatch(f"run {quote(run_id)} exists with another description: {'; '.join(diffs)}")
            return run.description

    def put(self, run_id: str, ref: StreamRef) -> str:
        with self._lock:
            run = self._run(run_id)
            wanted = run.description.model_fingerprint
            if ref.run_id != run_id or ref.target_model_version != wanted:
                self._observer.event(run_id, "refused")
                if ref.run_id != run_id:
                    raise RunMismatch(
                        f"sample {quote(ref.sample_id)} is of run {quote(ref.run_id)}, not of {quote(run_id)}"
                    )
                raise RunMismatch(
                    f"sample {quote(ref.sample_id)} was computed by model {quote(ref.target_model_version)}; "
                    f"run {quote(run_id)} is of model {quote(wanted)}"
                )
            sample = run.samples.get(ref.sample_id)
            if sample is None:
                if run.total is not None and len(run.samples) >= run.total:
                    raise RunMismatch(
                        f"run {quote(run_id)} is sealed at {run.total} samples; "
                        f"{quote(ref.sample_id)} is not one of them"
                    )
                run.samples[ref.sample_id] = _Sample(ref)
                run.fifo.append(ref.sample_id)
                run.sorted_ids = None
                run.pending += 1
                self._counts(run)
                return "new"
            if sample.state == ACKED:
                return "acked"
            if sample.ref.store_uri != ref.store_uri:
                run.recomputed += 1
                self._observer.event(run_id, "recomputed")
            sample.ref = ref
            return "replaced"

    def acquire(self, run_id: str, consumer: str) -> tuple[LeaseJSON | None, bool]:
        """The lease (or None) and whether the run is closed."""
        with self._lock:
            run = self._run(run_id)
            now = self._clock()
            self._reclaim(run, now)
            if not run.fifo:
                if not run.closed:
                    self._observer.event(run_id, "empty")
                return None, run.closed
            sample_id = run.fifo.popleft()
            sample = run.samples[sample_id]
            timeout = run.description.visibility_timeout_s
            sample.state, sample.lease_id, sample.deadline = LEASED, secrets.token_hex(8), now + timeout
            sample.deliveries += 1
            heapq.heappush(run.deadlines, (sample.deadline, sample_id, sample.lease_id))
            run.pending -= 1
            run.leased += 1
            self._counts(run)
            return LeaseJSON(sample.ref, sample.lease_id, timeout, sample.deliveries - 1), False

    def ack(self, run_id: str, sample_id: str, lease_id: str) -> None:
        """Idempotent: acking again under the lease that acked it is no error (a retried request)."""
        with self._lock:
            run = self._run(run_id)
            sample = self._held(run, sample_id, lease_id, ack=True)
            if sample.state == ACKED:
                return
            sample.state = ACKED
            run.leased -= 1
            run.acked += 1
            self._counts(run)

    def fail(self, run_id: str, sample_id: str, lease_id: str) -> None:
        with self._lock:
            run = self._run(run_id)
            self._requeue(run, sample_id, self._held(run, sample_id, lease_id, ack=False))
            self._counts(run)

    def reclaim(self, run_id: str) -> int:
        with self._lock:
            return self._reclaim(self._run(run_id), self._clock())

    def seal(self, run_id: str, total: int) -> None:
        with self._lock:
            run = self._run(run_id)
            if run.total is not None and run.total != total:
                raise RunMismatch(f"run {quote(run_id)} is sealed at {run.total} samples, not {total}")
            if total < len(run.samples):
                raise RunMismatch(f"run {quote(run_id)} already has {len(run.samples)} samples, more than {total}")
            run.total = total

    def state(self, run_id: str) -> RunStateJSON:
        with self._lock:
            return self._run(run_id).state()

    def samples(self, run_id: str, after: str | None, limit: int) -> list[SampleStatus]:
        if not 1 <= limit <= MAX_STREAM_IDS_PER_REQUEST:
            raise InvalidRequest(f"'limit' must be in [1, {MAX_STREAM_IDS_PER_REQUEST}], got {limit}")
        with self._lock:
            run = self._run(run_id)
            if run.sorted_ids is None:
                run.sorted_ids = sorted(run.samples)
            start = 0 if after is None else bisect.bisect_right(run.sorted_ids, after)
            page = run.sorted_ids[start : start + limit]
            return [SampleStatus(s, run.samples[s].state, run.samples[s].ref.store_uri) for s in page]

    def end(self, run_id: str) -> None:
        """Drop the run; ending a run that is not here is no error (a retried request)."""
        with self._lock:
            if self._runs.pop(run_id, None) is not None:
                self._observer.ended(run_id)

    # -- under the lock -------------------------------------------------------------------------

    def _run(self, run_id: str) -> _Run:
        run = self._runs.get(run_id)
        if run is None:
            raise _unknown_run(run_id)
        return run

    def _held(self, run: _Run, sample_id: str, lease_id: str, *, ack: bool) -> _Sample:
        sample = run.samples.get(sample_id)
        if sample is None:
            raise UnknownSample(f"run {quote(run.run_id)} has no sample {quote(sample_id)}")
        if sample.lease_id == lease_id and (sample.state == LEASED or (ack and sample.state == ACKED)):
            return sample
        now = f"{sample.state} under another lease" if sample.state != PENDING else "pending (its lease was returned)"
        raise LeaseNotHeld(
            f"sample {quote(sample_id)} of run {quote(run.run_id)} is not held under lease {quote(lease_id)}: it is "
            f"{now}; an expired lease may have been handed on"
        )

    def _requeue(self, run: _Run, sample_id: str, sample: _Sample) -> None:
        sample.state, sample.lease_id = PENDING, ""
        run.fifo.append(sample_id)
        run.leased -= 1
        run.pending += 1
        run.redelivered += 1
        self._observer.event(run.run_id, "redelivered")

    def _reclaim(self, run: _Run, now: float) -> int:
        reclaimed = 0
        while run.deadlines and run.deadlines[0][0] <= now:
            _, sample_id, lease_id = heapq.heappop(run.deadlines)
            sample = run.samples.get(sample_id)
            if sample is not None and sample.state == LEASED and sample.lease_id == lease_id:
                self._requeue(run, sample_id, sample)
                reclaimed += 1
        if reclaimed:
            self._counts(run)
        return reclaimed

    def _counts(self, run: _Run) -> None:
        self._observer.counts(run.run_id, run.pending, run.leased, run.acked)


def _unknown_run(run_id: str) -> UnknownRun:
    return UnknownRun(f"run {quote(run_id)} is not on this appliance's queue host; a producer creates it with open")
