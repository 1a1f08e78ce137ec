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
``close`` the leases not yet handed out go back to the queue at once (``fail``). A lease that
outlives its visibility timeout while it waits is dropped, never trained twice; and (unless
``in_order``) a sample whose appliance is not answering claims is handed back at once, so that
the readers are not all stuck on a frozen appliance while the producer moves its samples. A
claim still without its answer after :data:`STALL_S` stops holding its place: a spare reader
(up to twice ``k`` of them) leases the next sample meanwhile, so that the claims that went to an
appliance in the moment it froze (before anything told it was frozen) do not starve the trainer.
The stalled claim gives up after the store's ``generate_timeout`` and follows its sample to
where the producer moved it.

``ack_behind`` (the default with read-ahead): ``ack`` returns at once and a thread acks on the
queue, so that the trainer does not wait for the round trip; another thread then releases the
answer on its appliance, so that an appliance slow to answer (frozen) holds back no ack: acks
held back would outlive their leases and the samples be trained again. ``close`` (or
``flush``) waits for both.
"""

from __future__ import annotations

import logging
import os
import queue as queue_module
import socket
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from eagle3_client.protocol import LeaseJSON, StreamRef
from eagle3_client.streaming.queues import STALL_S, QueueBackend, StreamError
from eagle3_client.streaming.refs import from_upstream, upstream_lease

if TYPE_CHECKING:
    from eagle3_client.streaming.store import ApplianceFeatureStore

__all__ = ["StreamQueue"]

logger = logging.getLogger(__name__)

_SPARES_PER_PLACE = 2  # spare readers per read-ahead place, for stalled claims


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
        ack_behind: bool | None = None,
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
        self._slots: dict[int, tuple[LeaseJSON, float] | None] = {}  # (lease, when it was granted)
        self._leased = 0  # numbers given out
        self._next = 0  # the number acquire() hands out next, in order
        self._places = read_ahead
        self._reading: dict[int, float] = {}  # reader -> when it began leasing and claiming (now)
        self._leasing = threading.Lock()
        self._cond = threading.Condition()
        self._readers = [
            threading.Thread(target=self._read_ahead, args=(i,), name=f"stream-read-ahead-{i}", daemon=True)
            for i in range(read_ahead * (1 + _SPARES_PER_PLACE))
        ]
        for reader in self._readers:
            reader.start()
        # Ack behind (default with read-ahead): ack() returns at once and a thread tells the queue
        # and the appliance; its failures are logged, as upstream's loader logs those of ack().
        self._acks: queue_module.Queue[tuple[StreamRef, str] | None] | None = None
        self._releases: queue_module.Queue[StreamRef | None] = queue_module.Queue()
        if read_ahead > 0 if ack_behind is None else ack_behind:
            self._acks = queue_module.Queue()
            self._acker = threading.Thread(target=self._ack_behind, name="stream-ack-behind", daemon=True)
            self._releaser = threading.Thread(target=self._release_behind, name="stream-release-behind", daemon=True)
            self._acker.start()
            self._releaser.start()

    @property
    def run_id(self) -> str:
        return self.backend.run_id

    # -- consumer side (what FeatureDataLoader calls) --------------------------------------

    def acquire(self, *, poll_interval: float = 0.05) -> Any:
        """Upstream's ``Lease`` of the oldest ready sample, or None (nothing ready yet, or closed).

        Read ahead: the next in lease order (``in_order``), else the first whose claim is done;
        when none is, it waits up to ``poll_interval`` for one (upstream's loader sleeps that long
        after a None: the sample is handed out as its claim ends, not at the next poll).
        """
        if self._readers:
            deadline = time.monotonic() + poll_interval
            with self._cond:
                while (taken := self._take_ready()) is None and not self._closed and not self._run_closed:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.notify_all()  # a place may have come free
                    self._cond.wait(left)
                self._cond.notify_all()
            return None if taken is None else upstream_lease(*taken)
        if self._closed or self._run_closed:
            return None
        leased = self.backend.acquire(self.consumer)
        return None if leased is None else upstream_lease(leased)

    def _take_ready(self) -> tuple[LeaseJSON, float] | None:
        """A claimed lease to hand out, and when it was granted (the condition's lock is held).

        A lease whose visibility timeout ran out while it waited here is dropped: the queue has
        delivered its sample again (to another trainer, or to this one later), and training it
        here too would train it twice.
        """
        now = time.monotonic()
        for number, slot in list(self._slots.items()):
            if slot is not None and now > slot[1] + slot[0].visibility_timeout_s:
                logger.warning("read-ahead of %s outlived its lease: dropped", slot[0].ref.sample_id)
                if self._store is not None:
                    self._store.drop_held(slot[0].ref.sample_id)
                self._slots[number] = None
        while self._next in self._slots and self._slots[self._next] is None:
            del self._slots[self._next]  # its claim failed: the sample went back to the queue
            self._next += 1
        if self.in_order:
            if self._slots.get(self._next) is None:
                return None
            self._next += 1
            return self._slots.pop(self._next - 1)
        for number in [n for n, slot in self._slots.items() if slot is None]:
            del self._slots[number]  # out of order, a failed or dropped slot frees its place at once
        done = sorted(self._slots)
        return self._slots.pop(done[0]) if done else None

    def _busy_places(self) -> tuple[int, float]:
        """Places taken (held samples, claims not yet stalled) and how long until the next claim
        stalls, bounded (the condition's lock is held)."""
        now = time.monotonic()
        active = [began + STALL_S - now for began in self._reading.values() if now - began < STALL_S]
        return len(self._slots) + len(active), max(0.01, min([0.5, *active]))

    def _read_ahead(self, reader: int) -> None:
        """One reader: lease a sample while fewer than ``read_ahead`` places are taken, claim it,
        hand it to ``acquire``. Stalled claims free their place (the module docstring)."""
        assert self._store is not None
        while True:
            with self._cond:
                while not self._closed:
                    busy, wait = self._busy_places()
                    if busy < self._places:
                        break
                    self._cond.wait(wait)
                if self._closed:
                    return
                self._reading[reader] = time.monotonic()
            leased, number, granted = None, -1, 0.0
            try:
                if not self._run_closed:
                    with self._leasing:  # numbered in the order the queue leased them
                        granted = time.monotonic()
                        leased = self.backend.acquire(self.consumer)
                        if leased is not None:
                            number, self._leased = self._leased, self._leased + 1
                if leased is not None and not self.in_order and self._store.suspect(leased.ref.store_uri):
                    # Its appliance is not answering claims now: let the producer move it, take another.
                    self._give_back(leased)
                    leased = None
                    time.sleep(0.05)
                elif leased is not None:
                    self._store.hold(leased.ref.sample_id, self._store.fetch(leased.ref))
            except Exception as exc:  # noqa: BLE001 - the sample goes back to the queue; the loop goes on
                logger.warning("read-ahead of %s failed: %s", leased.ref.sample_id if leased else "a lease", exc)
                if leased is not None:
                    self._store.drop_held(leased.ref.sample_id)
                    self._give_back(leased)
                    leased = None
                time.sleep(0.5)
            with self._cond:
                del self._reading[reader]
                if number >= 0:
                    if leased is not None and self._closed:
                        self._store.drop_held(leased.ref.sample_id)
                        self._give_back(leased)
                    self._slots[number] = None if self._closed or leased is None else (leased, granted)
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
        """The sample is consumed (``LeaseNotHeld`` if the lease expired and went to another trainer;
        behind: logged, and the call returns before the queue has it)."""
        ref = from_upstream(lease.ref)
        if self._acks is not None:
            self._acks.put((ref, str(lease.lease_id)))
            return
        self._ack_now(ref, str(lease.lease_id))

    def _ack_now(self, ref: StreamRef, lease_id: str) -> None:
        self.backend.ack(ref.sample_id, lease_id)
        if self._on_ack is None:
            return
        if self._acks is not None:
            self._releases.put(ref)
        else:
            self._on_ack(ref)

    def _ack_behind(self) -> None:
        assert self._acks is not None
        while True:
            item = self._acks.get()
            try:
                if item is None:
                    return
                ref, lease_id = item
                try:
                    self._ack_now(ref, lease_id)
                except Exception as exc:  # noqa: BLE001 - as upstream's loader does with a failed ack
                    logger.warning("ack of sample %s failed: %s", ref.sample_id, exc)
            finally:
                self._acks.task_done()

    def _release_behind(self) -> None:
        while True:
            ref = self._releases.get()
            try:
                if ref is None:
                    return
                try:
                    if self._on_ack is not None:
                        self._on_ack(ref)
                except Exception as exc:  # noqa: BLE001 - best effort: the producer's sweep releases it later
                    logger.info("release of sample %s failed: %s", ref.sample_id, exc)
            finally:
                self._releases.task_done()

    def flush(self) -> None:
        """Wait until every ack sent behind has reached the queue, and its release the appliance."""
        if self._acks is not None:
            self._acks.join()
            self._releases.join()

    def fail(self, lease: Any) -> None:
        """Deliver the sample again (to any trainer), now."""
        self.backend.fail(lease.ref.sample_id, str(lease.lease_id))

    @property
    def is_closed(self) -> bool:
        if not (self._closed or self._run_closed):
            self._run_closed = self.backend.state().closed
        with self._cond:
            waiting = any(slot is not None for slot in self._slots.values())
        return self._closed or (self._run_closed and not waiting)

    def close(self) -> None:
        """Stop this consumer (the run's queue stays for the other trainers); read-ahead leases go back."""
        with self._cond:
            self._closed = True
            unread = [slot for slot in self._slots.values() if slot is not None]
            self._slots.clear()
            self._cond.notify_all()
        for leased, _ in unread:
            if self._store is not None:
                self._store.drop_held(leased.ref.sample_id)
            self._give_back(leased)
        if self._acks is not None:
            self._acks.put(None)
            self._acker.join(timeout=30)
            self._releases.put(None)
            self._releaser.join(timeout=30)
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
