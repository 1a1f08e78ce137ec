"""The consumer's queue: upstream's ``SampleRefQueue`` surface over a run's queue on any backend.

``FeatureDataLoader`` calls ``acquire`` (a lease or None), ``is_closed``, ``ack``, ``fail`` and
``close``. Here ``acquire`` leases from the run's queue (expired leases come back first);
``ack`` marks the sample consumed on the queue and then tells the appliance that keeps its
answer to drop it; ``is_closed`` is true once the run is closed (sealed and every sample
acked) or this consumer closed its queue. ``close`` ends this consumer's iteration only: the
run's queue is shared by every trainer and stays open for the others.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from typing import Any

from eagle3_client.protocol import StreamRef
from eagle3_client.streaming.queues import QueueBackend
from eagle3_client.streaming.refs import from_upstream, upstream_lease

__all__ = ["StreamQueue"]

logger = logging.getLogger(__name__)


class StreamQueue:
    """One consumer's (or producer's) view of a run's queue with upstream's method names."""

    def __init__(
        self,
        backend: QueueBackend,
        *,
        consumer: str | None = None,
        on_ack: Callable[[StreamRef], None] | None = None,
    ) -> None:
        self.backend = backend
        self.consumer = consumer or f"{socket.gethostname()}:{os.getpid()}"
        self._on_ack = on_ack  # the store drops the acked sample's answer on its appliance
        self._closed = False
        self._run_closed = False

    @property
    def run_id(self) -> str:
        return self.backend.run_id

    # -- consumer side (what FeatureDataLoader calls) --------------------------------------

    def acquire(self, *, poll_interval: float = 0.05) -> Any:
        """Upstream's ``Lease`` of the oldest ready sample, or None (nothing ready, or closed)."""
        if self._closed or self._run_closed:
            return None
        lease = self.backend.acquire(self.consumer)
        return None if lease is None else upstream_lease(lease)

    def ack(self, lease: Any) -> None:
        """The sample is consumed (``LeaseNotHeld`` if the lease expired and went to another trainer)."""
        ref = from_upstream(lease.ref)
        self.backend.ack(ref.sample_id, str(lease.lease_id))
        if self._on_ack is not None:
            self._on_ack(ref)

    def fail(self, lease: Any) -> None:
        """Deliver the sample again (to any trainer), now."""
        self.backend.fail(lease.ref.sample_id, str(lease.lease_id))

    @property
    def is_closed(self) -> bool:
        if not (self._closed or self._run_closed):
            self._run_closed = self.backend.state().closed
        return self._closed or self._run_closed

    def close(self) -> None:
        """Stop this consumer (the run's queue stays for the other trainers)."""
        self._closed = True

    # -- the rest of upstream's surface -----------------------------------------------------

    def put(self, ref: Any) -> None:
        """Queue upstream's ``SampleRef`` (a producer; ``eagle3-appliance produce`` does this for appliances)."""
        self.backend.put(from_upstream(ref))

    def reclaim_expired(self) -> int:
        return self.backend.reclaim_expired()

    def pending_count(self) -> int:
        return self.backend.state().pending

    def outstanding_count(self) -> int:
        return self.backend.state().leased
