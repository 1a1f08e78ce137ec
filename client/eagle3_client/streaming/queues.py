"""One run's queue of sample references: the contract every backend keeps (tensor-free).

A run's queue holds, for each sample id, its current reference (:class:`StreamRef`) and its
state: ``pending`` (ready to lease), ``leased`` (held by one consumer until its visibility
timeout) or ``acked`` (consumed: never delivered again). The semantics are upstream's
``SampleRefQueue`` (lease, ack, fail, visibility-timeout reclaim, redelivery counts), across
processes and hosts, with what a producer on several machines needs on top:

- ``open`` creates the run on first use with its :class:`RunDescription`, or checks that a
  later opener describes it the same way (:class:`RunMismatch`); a consumer opens without a
  description and gets :class:`UnknownRun` for a run nobody created.
- ``put`` of a new sample queues it; of a sample not yet acked it replaces the reference (the
  answer was computed again on another appliance: ``recomputed`` counts it; a leased sample
  stays leased); of an acked sample it does nothing and says so (a restarted producer never
  makes a sample be consumed twice). A reference of another model is refused (:class:`RunMismatch`).
- ``acquire`` first returns expired leases to pending (so no separate reclaimer must run),
  then leases the oldest pending sample, or returns None.
- ``ack`` / ``fail`` need the lease id the sample is held under now; anything else raises
  :class:`LeaseNotHeld` naming the sample and lease (an expired lease may have been handed on).
- ``seal(total)`` says every sample of the run has been put; the run is ``closed`` once it is
  sealed and ``total`` samples are acked. Consumers stop there.

Backends: :mod:`eagle3_client.streaming.appliance_queue` (hosted by an appliance) and
:mod:`eagle3_client.streaming.redis_queue` (Redis Streams); one contract test suite runs both.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from eagle3_client.errors import RemoteTargetError
from eagle3_client.protocol import (
    MAX_STREAM_IDS_PER_REQUEST,
    LeaseJSON,
    RunDescription,
    RunStateJSON,
    SampleStatus,
    StreamRef,
)

__all__ = [
    "STALL_S",
    "PUT_ACKED",
    "PUT_NEW",
    "PUT_REPLACED",
    "LeaseNotHeld",
    "QueueBackend",
    "QueueUnreachable",
    "RunMismatch",
    "StreamError",
    "UnknownRun",
    "UnknownSample",
    "check_page",
    "check_total",
]

# A claim without its answer this long is stalled: the read-ahead's spare reader takes its place
# (stream_queue) and the store holds the appliance suspect (store). Here, below both, so that
# neither imports the other for it.
STALL_S = 0.5

# What put() did: queued a new sample, moved a sample not yet acked, or nothing (already acked).
PUT_NEW, PUT_REPLACED, PUT_ACKED = "new", "replaced", "acked"


def check_total(total: int) -> int:
    """A ``seal`` total: an integer >= 0 (ValueError otherwise, before anything is sent)."""
    if isinstance(total, bool) or not isinstance(total, int) or total < 0:
        raise ValueError(f"the total must be an integer >= 0, got {total!r}")
    return total


def check_page(limit: int) -> int:
    """A ``samples`` page size: 1 to MAX_STREAM_IDS_PER_REQUEST (ValueError otherwise)."""
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_STREAM_IDS_PER_REQUEST:
        raise ValueError(f"'limit' must be in [1, {MAX_STREAM_IDS_PER_REQUEST}], got {limit!r}")
    return limit


class StreamError(RemoteTargetError):
    """Base class of the stream's errors (a queue or a kept answer)."""


class QueueUnreachable(StreamError):
    """The queue's server (an appliance or Redis) does not answer."""


class UnknownRun(StreamError):
    """No queue (or no kept answer) exists for this run id."""


class UnknownSample(StreamError):
    """The run has no such sample (queue), or the appliance keeps no answer for it (store)."""


class RunMismatch(StreamError):
    """The run exists with another description, or a reference is of another model than the run's."""


class LeaseNotHeld(StreamError):
    """``ack`` / ``fail`` of a lease that is not the one the sample is held under now."""


class QueueBackend(ABC):
    """One run's queue on one backend (see the module docstring for the semantics).

    Safe to use from several threads; every method is one round trip to the backend, which
    makes each operation atomic across processes and hosts.
    """

    url: str  # the queue URL it was opened with (appliance://host:port or redis://host:port/db)
    run_id: str

    @abstractmethod
    def open(self, description: RunDescription | None = None) -> RunDescription:
        """Create the run (first opener) or check ``description`` against it; None: it must exist."""

    @abstractmethod
    def put(self, ref: StreamRef) -> str:
        """Queue or move ``ref``'s sample: :data:`PUT_NEW`, :data:`PUT_REPLACED` or :data:`PUT_ACKED`."""

    @abstractmethod
    def acquire(self, consumer: str) -> LeaseJSON | None:
        """Lease the oldest pending sample for ``consumer`` (a name, for operators), or None."""

    @abstractmethod
    def ack(self, sample_id: str, lease_id: str) -> None:
        """The sample is consumed: never delivered again."""

    @abstractmethod
    def fail(self, sample_id: str, lease_id: str) -> None:
        """The sample goes back to pending now (redelivered, its count one higher)."""

    @abstractmethod
    def reclaim_expired(self) -> int:
        """Return every expired lease's sample to pending; how many."""

    @abstractmethod
    def seal(self, total: int) -> None:
        """Every sample of the run has been put: ``total`` of them (a second seal must agree)."""

    @abstractmethod
    def state(self) -> RunStateJSON:
        """The run's counts (and whether it is closed)."""

    @abstractmethod
    def samples(self, after: str | None = None, limit: int = 1000) -> list[SampleStatus]:
        """Up to ``limit`` samples in sample-id order after ``after``: each one's state and location."""

    @abstractmethod
    def end(self) -> None:
        """Delete the run's queue (its references and counts)."""

    def locate(self, sample_id: str) -> SampleStatus | None:
        """One sample's state and location, or None (a backend may answer it in one round trip;
        this pages through :meth:`samples`, which is only done when an appliance is gone)."""
        after: str | None = None
        while True:
            page = self.samples(after, limit=1000)
            for status in page:
                if status.sample_id == sample_id:
                    return status
            if len(page) < 1000:
                return None
            after = page[-1].sample_id

    def close(self) -> None:
        """Release this process's connection (the run's queue stays)."""
