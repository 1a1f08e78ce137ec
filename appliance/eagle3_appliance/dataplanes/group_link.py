"""This server's end of one private two-rank group: its rendezvous, then its sends, in order, on its own thread."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from eagle3_appliance.dataplanes.resend_store import ResendStore
from eagle3_client import protocol
from eagle3_client.errors import first_line
from eagle3_client.transports.transfer import (
    Group,
    JoinRejected,
    RendezvousStore,
)

__all__ = ["PROOF_TIMEOUT_S", "GroupLink", "LinkStats", "SendCounter", "SerialWorker"]

logger = logging.getLogger(__name__)

# How long the server waits for the join proof once a peer has joined. Our client sends it
# the moment its end of the group is up, so this only bounds a stranger's (or a dead peer's) hold.
PROOF_TIMEOUT_S = 5.0


class SerialWorker:
    """One daemon thread that runs jobs in submission order (a link's rendezvous, then its sends).

    A daemon, unlike a thread pool's workers: a gloo send to a frozen peer cannot be
    interrupted (it ends at its deadline), and it must not keep the process alive after the
    drain has given up on it. Nothing is queued once :meth:`stop` was called.
    """

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue[tuple[concurrent.futures.Future[Any], Callable[..., Any], tuple[Any, ...]] | None]
        self._jobs = queue.SimpleQueue()
        self._stopped = False
        self._lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def submit(self, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future[Any] | None:
        """Queue ``fn(*args)``; None once the worker is stopped (nothing will run it)."""
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        with self._lock:
            if self._stopped:
                return None
            self._jobs.put((future, fn, args))
        return future

    def stop(self) -> None:
        """Run what is queued, then end the thread."""
        with self._lock:
            if not self._stopped:
                self._stopped = True
                self._jobs.put(None)

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            future, fn, args = job
            del job
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args))
                except BaseException as exc:  # noqa: BLE001 - handed to whoever waits on the future
                    future.set_exception(exc)
            del future, fn, args  # the tensors of a finished send are not held until the next job


@dataclass
class LinkStats:
    transfers: int = 0
    bytes: int = 0
    seconds: float = 0.0
    failures: int = 0
    last_error: str | None = None


class SendCounter:
    """Group sends queued or running, server-wide: the drain waits for them like for requests."""

    def __init__(self) -> None:
        self._n = 0
        self._lock = threading.Lock()

    def add(self, n: int) -> None:
        with self._lock:
            self._n += n

    @property
    def value(self) -> int:
        return self._n


class GroupLink:
    """This server's end (rank 0) of one group: rendezvous, then sends in order on its own thread.

    ``setup(link)`` builds the :class:`Group` (and checks the peer, says hello) on the link's
    thread; ``frame`` sends one transfer on it. Both the join protocol and the framing differ
    for upstream's NCCL clients (:mod:`eagle3_appliance.dataplanes.upstream_nccl`), which use this class too.
    ``store`` is the link's :class:`~eagle3_client.transports.transfer.RendezvousStore`: detaching it
    (:meth:`rendezvous_done`, :meth:`close`) closes the rendezvous port and ends a rendezvous
    still waiting; ``on_port_free`` then gives the port back to the pool.
    """

    def __init__(
        self,
        tier: str,
        port: int,
        timeout: float,
        setup: Callable[[GroupLink], Group],
        frame: Callable[[Group, int, Mapping[str, torch.Tensor], float], int],
        *,
        store: RendezvousStore | None = None,
        on_port_free: Callable[[int], None] = lambda port: None,
        on_close: Callable[[GroupLink], None] = lambda link: None,
        sends: SendCounter,
        kept: ResendStore | None = None,
        client: str = "",
    ) -> None:
        self.tier, self.port, self.timeout, self.client = tier, port, timeout, client
        self.state = "connecting"
        self.stats = LinkStats()
        self.group: Group | None = None
        self.store = store
        self.kept = kept  # where this link's results are kept for resends (None: not kept)
        self.sends = sends
        self._frame = frame
        self._on_port_free = on_port_free
        self._on_close = on_close
        self._port_freed = False
        self._closed = False
        self._lock = threading.Lock()
        self.ready: concurrent.futures.Future[bool] = concurrent.futures.Future()
        self._worker = SerialWorker(f"data-plane-{port}")
        self._worker.submit(self._setup, setup)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def pending(self) -> bool:
        """Still in its rendezvous (no group yet)."""
        return not self._closed and not self.ready.done()

    def _setup(self, setup: Callable[[GroupLink], Group]) -> None:
        try:
            group = setup(self)
        except JoinRejected as exc:
            self._failed(exc, "join", state="rejected")
            _resolve(self.ready, False)
            return
        except Exception as exc:  # noqa: BLE001 - recorded as text; the exception (and its frames) is not kept
            self._failed(exc, "rendezvous")
            _resolve(self.ready, False)
            return
        with self._lock:
            closed = self._closed
            if not closed:
                self.group = group
                self.state = "ready"
        if closed:
            group.close()
        _resolve(self.ready, not closed)

    async def wait_ready(self) -> bool:
        """True once the group is up; False if it failed, was closed, or does not come up in time."""
        if self._closed:
            return False
        try:
            ok = await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(self.ready)), timeout=self.timeout)
        except Exception:  # noqa: BLE001 - any failure means: answer over the wire
            return False
        return bool(ok) and not self._closed

    def rendezvous_done(self) -> None:
        """The peer no longer needs the store: close it (and its port) now, not with the group."""
        if self.store is not None:
            self.store.detach()
        self._free_port()

    def _free_port(self) -> None:
        with self._lock:
            freed, self._port_freed = self._port_freed, True
        if not freed:
            self._on_port_free(self.port)

    def send(self, seq: int, tensors: Mapping[str, torch.Tensor]) -> concurrent.futures.Future[int]:
        """Queue transfer ``seq`` behind any earlier one of this session; never raises.

        On a link that is closed (even one closed a moment ago, between the metadata and this
        call) the future fails at once and nothing is sent: the client's receive then fails
        and it fetches the stored result over the wire.
        """
        self.sends.add(1)
        future = self._worker.submit(self._send, seq, tensors)
        if future is None:  # the link is closed: nothing was queued
            self.sends.add(-1)
            future = concurrent.futures.Future()
            future.set_exception(RuntimeError(f"the {self.tier} link on port {self.port} is closed"))
        return future

    def _send(self, seq: int, tensors: Mapping[str, torch.Tensor]) -> int:
        try:
            group = self.group
            if group is None or self._closed:
                return 0
            start = time.perf_counter()
            try:
                nbytes = self._frame(group, seq, tensors, self.timeout)
            except Exception as exc:  # noqa: BLE001 - recorded; the client recovers over the wire
                self._failed(exc, f"transfer {seq}")
                return 0
            self.stats.transfers += 1
            self.stats.bytes += nbytes
            self.stats.seconds += time.perf_counter() - start
            return nbytes
        finally:
            self.sends.add(-1)

    def _failed(self, exc: BaseException, what: str, state: str = "failed") -> None:
        text = first_line(exc)
        self.stats.failures += 1
        self.stats.last_error = f"{what}: {text}"[:500]
        if state == "rejected":
            logger.warning(
                "data plane %s port %d (%s): the peer that joined did not prove to own the session (%s); "
                "closed the group and its port. Is a stranger reaching the data-plane ports?",
                *self._who(),
                text,
            )
        elif not self._closed:
            logger.warning("data plane %s port %d (%s): %s failed, dropping the group: %s", *self._who(), what, text)
        self.close(state)

    def _who(self) -> tuple[str, int, str]:
        return self.tier, self.port, self.client or "anonymous"

    def close(self, state: str = "closed") -> None:
        """Tear down this end; safe from any thread, idempotent.

        The rendezvous store is dropped at once (its port is free; a rendezvous still waiting
        ends), NCCL is aborted at once (that unblocks a stuck send); a gloo send in flight
        ends with the peer's sockets or its own deadline, and the group is dropped after it.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self.state = state
            group = self.group
        _resolve(self.ready, False)
        self.rendezvous_done()
        if group is not None and group.tier == protocol.TIER_NCCL:
            group.close()
        self._worker.submit(self._release)
        self._worker.stop()
        self._on_close(self)

    def _release(self) -> None:
        group, self.group = self.group, None
        if group is not None:
            group.close()

    def join(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for the link's thread to end (after :meth:`close`); True if it did.

        The thread drops the group; the process must not exit while it does, or the group's
        C++ teardown races the interpreter's and the process aborts.
        """
        self._worker.thread.join(max(0.0, timeout))
        return not self._worker.thread.is_alive()

    def describe(self) -> dict[str, Any]:
        return {
            "client": self.client,
            "tier": self.tier,
            "port": self.port,
            "state": self.state,
            "transfers": self.stats.transfers,
            "bytes": self.stats.bytes,
            "seconds": round(self.stats.seconds, 6),
            "failures": self.stats.failures,
            "last_error": self.stats.last_error,
        }


def _resolve(future: concurrent.futures.Future[bool], value: bool) -> None:
    try:
        future.set_result(value)
    except concurrent.futures.InvalidStateError:  # already resolved (a race with close)
        pass
