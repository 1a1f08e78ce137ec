"""The consumer's queue: upstream's ``SampleRefQueue`` surface over a run's queue on any backend.

``FeatureDataLoader`` calls ``acquire`` (a lease or None), ``is_closed``, ``ack``, ``fail`` and
``close``. Here ``acquire`` leases from the run's queue (expired leases come back first);
``ack`` marks the sample consumed on the queue and then tells the appliance that keeps its
answer to drop it; ``is_closed`` is true once the run is closed (sealed and every sample
acked) or this consumer closed its queue. ``close`` ends this consumer's iteration only: the
run's queue is shared by every trainer and stays open for the others.

With ``read_ahead=k`` the queue leases and claims up to ``k`` samples in the background (each
claim on its own thread) and ``acquire`` hands out the first one whose tensors have arrived:
an appliance that is slow, frozen or gone holds back only its own samples, which the producer
moves elsewhere, while the trainer takes the others. With ``in_order`` it hands them out in the
order the queue leased them instead (a trainer that must see the producer's order). The leases
read ahead count against the visibility timeout: keep it well above ``k`` training steps. On
``close`` the leases not yet handed out go back to the queue at once (``fail``).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from eagle3_client.protocol import LeaseJSON, StreamRef
from eagle3_client.streaming.queues import QueueBackend, StreamError
from eagle3_client.streaming.refs import from_upstream, upstream_lease

if TYPE_CHECKING:
    from eagle3_client.streaming.store import ApplianceFeatureStore

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
        read_ahead: int = 0,
        store: ApplianceFeatureStore | None = None,
        in_order: bool = False,
    ) -> None:
        if read_ahead < 0 or (read_ahead and store is None):
            raise ValueError("read_ahead is a count >= 0, and needs the store that claims the samples")
        self.backend = backend
        self.consumer = consumer or f"{socket.gethostname()}:{os.getpid()}"
        self._on_ack = on_ack  # the store drops the acked sample's answer on its appliance
        self._closed = False
        self._run_closed = False
        self._store = store
        self.in_order = in_order
        # Read ahead: leases numbered in the order they were leased; a slot holds the lease once its
        # sample is claimed, or None when its claim failed (the sample went back to the queue).
        self._slots: dict[int, LeaseJSON | None] = {}
        self._leased = 0  # numbers given out
        self._next = 0  # the number acquire() hands out next, in order
        self._reading = 0  # leases being claimed now
        self._leasing = threading.Lock()
        self._cond = threading.Condition()
        self._readers = [
            threading.Thread(target=self._read_ahead, name=f"stream-read-ahead-{i}", daemon=True)
            for i in range(read_ahead)
        ]
        for reader in self._readers:
            reader.start()

    @property
    def run_id(self) -> str:
        return self.backend.run_id

    # -- consumer side (what FeatureDataLoader calls) --------------------------------------

    def acquire(self, *, poll_interval: float = 0.05) -> Any:
        """Upstream's ``Lease`` of the oldest ready sample, or None (nothing ready yet, or closed).

        Read ahead: the next in lease order (``in_order``), else the first whose claim is done.
        """
        if self._readers:
            with self._cond:
                lease = self._take_ready()
                self._cond.notify_all()
            return None if lease is None else upstream_lease(lease)
        if self._closed or self._run_closed:
            return None
        leased = self.backend.acquire(self.consumer)
        return None if leased is None else upstream_lease(leased)

    def _take_ready(self) -> LeaseJSON | None:
        """A claimed lease to hand out (the condition's lock is held)."""
        while self._next in self._slots and self._slots[self._next] is None:
            del self._slots[self._next]  # its claim failed: the sample went back to the queue
            self._next += 1
        if self.in_order:
            if self._slots.get(self._next) is None:
                return None
            self._next += 1
            return self._slots.pop(self._next - 1)
        done = sorted(n for n, leased in self._slots.items() if leased is not None)
        return self._slots.pop(done[0]) if done else None

    def _read_ahead(self) -> None:
        """One reader: lease a sample when fewer than ``read_ahead`` are held, claim it, hand it to ``acquire``."""
        assert self._store is not None
        limit = len(self._readers)
        while True:
            with self._cond:
                while not self._closed and len(self._slots) + self._reading >= limit:
                    self._cond.wait(0.5)
                if self._closed:
                    return
                self._reading += 1
            leased, number = None, -1
            try:
                if not self._run_closed:
                    with self._leasing:  # numbered in the order the queue leased them
                        leased = self.backend.acquire(self.consumer)
                        if leased is not None:
                            number, self._leased = self._leased, self._leased + 1
                if leased is not None:
                    self._store.hold(leased.ref.sample_id, self._store.fetch(leased.ref))
            except Exception as exc:  # noqa: BLE001 - the sample goes back to the queue; the loop goes on
                logger.warning("read-ahead of %s failed: %s", leased.ref.sample_id if leased else "a lease", exc)
                if leased is not None:
                    self._store.drop_held(leased.ref.sample_id)
                    self._give_back(leased)
                    leased = None
                time.sleep(0.5)
            with self._cond:
                self._reading -= 1
                if number >= 0:
                    if leased is not None and self._closed:
                        self._store.drop_held(leased.ref.sample_id)
                        self._give_back(leased)
                    self._slots[number] = None if self._closed else leased
                self._cond.notify_all()
            if number < 0:
                if not self._run_closed:
                    self._run_closed = self.backend.state().closed
                if self._run_closed:
                    return  # every sample is acked: nothing more will come
                time.sleep(0.05)

    def _give_back(self, leased: LeaseJSON) -> None:
        try:
            self.backend.fail(leased.ref.sample_id, leased.lease_id)
        except StreamError as exc:  # it expired meanwhile: the queue delivers it again anyway
            logger.info("giving back %s: %s", leased.ref.sample_id, exc)

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
        with self._cond:
            waiting = any(leased is not None for leased in self._slots.values())
        return self._closed or (self._run_closed and not waiting)

    def close(self) -> None:
        """Stop this consumer (the run's queue stays for the other trainers); read-ahead leases go back."""
        with self._cond:
            self._closed = True
            unread = [leased for leased in self._slots.values() if leased is not None]
            self._slots.clear()
            self._cond.notify_all()
        for leased in unread:
            if self._store is not None:
                self._store.drop_held(leased.ref.sample_id)
            self._give_back(leased)
        for reader in self._readers:
            reader.join(timeout=5)

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
