"""Our process-group data planes, server side: one private NCCL or gloo group per session.

Why per session: every data-parallel rank of a trainer registers its own session, so each
gets its own group and sender thread. Sends never run on the model thread or the event
loop, so one client's slow or broken transfer delays nobody else by more than the forward
they share.

Protocol (names in :mod:`eagle3_client.protocol`):

* ``POST /session`` replies with ``"data_planes"``: the tiers this server offers.
* ``POST /data_plane`` ``{"tier": "gloo"|"nccl", "proof": true}``: the server (rank 0) opens a
  rendezvous store on a port from ``--data-plane-ports`` (the kernel's choice when unset) and
  replies ``{"tier", "port", "key", "nonce", "timeout", "secret"}``. In the background it
  builds its end of the group (store keys under ``key``), waits for the client's first
  message, the ``secret`` (:func:`eagle3_client.transfer.check_proof`: a peer that cannot
  prove it owns the session gets nothing, and the group and its port are closed), closes
  the store, and sends a zero-tensor hello numbered ``nonce``, which the client checks. A
  client that does not ask for the proof (an older one) gets the hello at once and no
  ``secret``. ``{"tier": "wire"}`` tears the session's group down.
* ``/generate`` with ``X-Eagle3-Transfer: <seq>``: the answer is the transfer's metadata (JSON,
  header echoed) and the tensors follow on the group (framing in :mod:`eagle3_client.transfer`).
  The result is kept as the session's last result. If the session has no working group the
  answer is a plain wire blob without the echo, which tells the client to fall back.
* ``POST /data_plane/resend`` ``{"seq": n}``: the stored result of transfer ``n`` as a wire
  blob, so a broken transfer costs no second forward. Results are kept within
  ``--resend-budget-mb`` (:class:`ResendStore`); a result dropped for the budget answers
  ``RESEND_CONFLICT_STATUS`` and the client sends its ``/generate`` again.
* ``GET /data_plane``: every group's state and counters (JSON).

A failed or timed-out send tears the group down on this side; the peer's end then fails
too (gloo closes its sockets, NCCL is aborted). Each link's sender is a daemon thread, so
a send stuck on a frozen peer holds neither the event loop nor the process at exit; the
drain waits for sends in flight like for requests (:mod:`eagle3_appliance.lifecycle`).

The HTTP endpoints are in :mod:`eagle3_appliance.dataplane_routes`; this module holds the
state they share and :class:`GroupTransfer`, the ``/generate`` answer on a group.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import secrets
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
import torch
from sanic import Request

from eagle3_appliance.admission import Ticket
from eagle3_appliance.buffers import ServerBuffers
from eagle3_appliance.errors import ApplianceError, Unavailable
from eagle3_appliance.sessions import Session
from eagle3_appliance.settings import Settings, parse_port_range
from eagle3_appliance.transfer import Transfer, device_ready, send_wire
from eagle3_client import protocol
from eagle3_client.transfer import (
    PROOF_BYTES,
    Group,
    JoinRejected,
    RendezvousStore,
    TransferMetadata,
    check_proof,
    gloo_available,
    host_store,
    nccl_available,
    open_group,
    send_transfer,
)

__all__ = [
    "LINK_KEY",
    "PROOF_TIMEOUT_S",
    "RESULT_KEY",
    "DataPlaneServer",
    "GroupLink",
    "GroupTransfer",
    "NoStoredResult",
    "PortPool",
    "ResendStore",
    "SerialWorker",
    "StoredResult",
    "TierNotOffered",
    "close_link",
    "connection_closed",
]

logger = logging.getLogger(__name__)

LINK_KEY = "data_plane"  # session.extras: the session's GroupLink
RESULT_KEY = "last_result"  # session.extras: the StoredResult of its last group transfer
_NONCE_LIMIT = 2**52  # hello numbers stay exact in any JSON reader
_KEEP_CLOSED = 32  # closed links listed by GET /data_plane, newest last
# How long the server waits for the join proof once a peer has joined. Our client sends it
# the moment its end of the group is up, so this only bounds a stranger's (or a dead peer's) hold.
PROOF_TIMEOUT_S = 5.0


class TierNotOffered(ApplianceError):
    status_code = 409


class NoStoredResult(ApplianceError):
    status_code = protocol.RESEND_CONFLICT_STATUS


# -- ports -------------------------------------------------------------------------------


class PortPool:
    """Rendezvous ports: the configured range (firewalls between nodes), else the kernel's choice.

    Ports taken by our own live groups are skipped; a port some other process holds fails to
    bind and the next one is tried. The search starts after the last port handed out, so a
    just-released port is the last to be reused.
    """

    def __init__(self, port_range: tuple[int, int] | None) -> None:
        self.range = port_range
        self._in_use: set[int] = set()
        self._next = 0
        self._lock = threading.Lock()

    def open_store(self, host: str, timeout: float) -> tuple[Any, int]:
        """A listening rendezvous store and its port (blocking; run off the event loop)."""
        if self.range is None:
            store = host_store(host, 0, timeout)
            with self._lock:
                self._in_use.add(int(store.port))
            return store, int(store.port)
        first, last = self.range
        count = last - first + 1
        for i in range(count):
            with self._lock:
                port = first + (self._next + i) % count
                if port in self._in_use:
                    continue
                self._in_use.add(port)
            try:
                store = host_store(host, port, timeout)
            except RuntimeError:  # held by another process
                self.release(port)
                continue
            with self._lock:
                self._next = (port - first + 1) % count
            return store, port
        raise Unavailable(f"every data-plane port in {first}-{last} is in use; widen --data-plane-ports")

    def release(self, port: int) -> None:
        with self._lock:
            self._in_use.discard(port)

    def __len__(self) -> int:
        return len(self._in_use)


# -- answers kept for resends ------------------------------------------------------------


@dataclass
class StoredResult:
    """A session's last group-transfer result, kept so that a broken transfer can be resent over the wire."""

    seq: int
    tensors: dict[str, torch.Tensor]
    headers: Mapping[str, str] | None = None  # of a wire answer of it (the encoding's name)
    nbytes: int = 0
    dropped: str | None = None  # why the tensors are gone, when they were dropped to stay within the budget
    kept_in: ResendStore | None = None

    def drop(self, reason: str) -> None:
        self.tensors = {}
        self.dropped = reason

    def close(self) -> None:
        """The session moved on (a newer result) or ended: give the memory back."""
        if self.kept_in is not None:
            self.kept_in.release(self)
        self.tensors = {}


class ResendStore:
    """Every session's last result, within ``--resend-budget-mb``: the oldest are dropped first.

    Why: a result is ~300 MB for a 2048-token batch of an 8B target and, on NCCL, lives in GPU
    memory; one per data-parallel rank would otherwise grow with the number of trainer ranks.
    A dropped result costs only a recompute, and only if that transfer breaks: the resend is
    refused with ``RESEND_CONFLICT_STATUS`` and the client sends its ``/generate`` again.
    Used from the event loop and, when a session ends, from a worker thread (so: a lock).
    """

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self.held_bytes = 0
        self.dropped = 0
        self._kept: OrderedDict[int, StoredResult] = OrderedDict()
        self._lock = threading.Lock()

    def keep(self, result: StoredResult) -> None:
        """Hold ``result`` (newest); drop the oldest ones until the held bytes fit the budget."""
        with self._lock:
            if result.nbytes > self.budget_bytes:
                result.drop(f"it alone is larger than --resend-budget-mb ({self._budget_text()})")
                self.dropped += 1
                return
            result.kept_in = self
            self._kept[id(result)] = result
            self.held_bytes += result.nbytes
            while self.held_bytes > self.budget_bytes:
                _, oldest = self._kept.popitem(last=False)
                self.held_bytes -= oldest.nbytes
                oldest.drop(f"newer answers filled --resend-budget-mb ({self._budget_text()})")
                self.dropped += 1

    def release(self, result: StoredResult) -> None:
        with self._lock:
            if self._kept.pop(id(result), None) is not None:
                self.held_bytes -= result.nbytes

    def _budget_text(self) -> str:
        return f"{self.budget_bytes / 2**20:g} MiB"

    def describe(self) -> dict[str, Any]:
        with self._lock:
            return {
                "budget_bytes": self.budget_bytes,
                "held_bytes": self.held_bytes,
                "held": len(self._kept),
                "dropped": self.dropped,
            }


# -- one session's group -----------------------------------------------------------------


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
    for upstream's NCCL clients (:mod:`eagle3_appliance.upstream_nccl`), which use this class too.
    ``store`` is the link's :class:`~eagle3_client.transfer.RendezvousStore`: detaching it
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
        sends: SendCounter | None = None,
        kept: ResendStore | None = None,
        client: str = "",
    ) -> None:
        self.tier, self.port, self.timeout, self.client = tier, port, timeout, client
        self.state = "connecting"
        self.stats = LinkStats()
        self.group: Group | None = None
        self.created = time.time()
        self.store = store
        self.kept = kept  # where this link's results are kept for resends (None: not kept)
        self.sends = sends or SendCounter()
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
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
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
        if self.store is not None:
            self.store.detach()
        self._free_port()
        if group is not None and group.tier == protocol.TIER_NCCL:
            group.close()
        self._worker.submit(self._release)
        self._worker.stop()
        self._on_close(self)

    def _release(self) -> None:
        group, self.group = self.group, None
        if group is not None:
            group.close()

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


def _our_frame(group: Group, seq: int, tensors: Mapping[str, torch.Tensor], timeout: float) -> int:
    return send_transfer(group, seq, list(tensors.values()), timeout)


# -- the server-wide part ----------------------------------------------------------------


class DataPlaneServer:
    """What the data-plane handlers share: the offered tiers, the port pool, the live links,
    the answers kept for resends and the count of sends in flight."""

    def __init__(self, settings: Settings, offered: list[str], device: torch.device, ports: PortPool) -> None:
        self.settings = settings
        self.offered = offered
        self.device = device
        self.ports = ports
        self.kept = ResendStore(settings.resend_budget_mb << 20)
        self.sends = SendCounter()
        self.live: list[GroupLink] = []
        self.closed: deque[dict[str, Any]] = deque(maxlen=_KEEP_CLOSED)  # descriptions only: nothing stays referenced
        self._lock = threading.Lock()

    @classmethod
    def create(cls, settings: Settings, device: torch.device) -> DataPlaneServer:
        allowed = {t.strip() for t in settings.data_planes.split(",") if t.strip()}
        offered = []
        if protocol.TIER_NCCL in allowed and device.type == "cuda" and nccl_available():
            offered.append(protocol.TIER_NCCL)
        if protocol.TIER_GLOO in allowed and gloo_available():
            offered.append(protocol.TIER_GLOO)
        offered.append(protocol.TIER_WIRE)
        return cls(settings, offered, device, PortPool(parse_port_range(settings.data_plane_ports)))

    def group_device(self, tier: str) -> torch.device:
        return self.device if tier == protocol.TIER_NCCL else torch.device("cpu")

    async def open_link(self, session: Session, tier: str, *, proof: bool) -> tuple[GroupLink, int, str, str | None]:
        """Open a store, start the rendezvous in the background; the link, its hello nonce, its key and secret.

        Anyone who reaches the store's port can read the keys, so ``key`` is only a namespace.
        With ``proof`` the peer must send ``secret`` (known only from the HTTP reply) as its
        first message before the server sends it anything; the store is closed right after.
        """
        timeout = self.settings.data_plane_timeout
        tcp_store, port = await asyncio.to_thread(self.ports.open_store, self.settings.host, timeout)
        store = RendezvousStore(tcp_store, timeout)
        del tcp_store  # the link's RendezvousStore is its only owner: detaching it closes the port
        nonce = secrets.randbelow(_NONCE_LIMIT - 1) + 1
        key = secrets.token_hex(16)
        secret = secrets.token_bytes(PROOF_BYTES) if proof else None
        device = self.group_device(tier)

        def setup(link: GroupLink) -> Group:
            group = open_group(tier, store, 0, timeout, device, key_prefix=f"{key}/")
            try:
                if secret is not None:
                    link.state = "verifying"
                    check_proof(group, nonce, secret, min(timeout, PROOF_TIMEOUT_S))
                    link.rendezvous_done()  # the peer has its end: the store (and its port) can go
                send_transfer(group, nonce, [], timeout)  # the hello
            except BaseException:
                group.close()
                raise
            return group

        link = GroupLink(
            tier,
            port,
            timeout,
            setup,
            _our_frame,
            store=store,
            on_port_free=self.ports.release,
            on_close=self.retire,
            sends=self.sends,
            kept=self.kept,
            client=session.client,
        )
        self.track(link)
        return link, nonce, key, (secret.hex() if secret is not None else None)

    def track(self, link: GroupLink) -> None:
        """Count a link as live until it closes (then only its description is kept)."""
        with self._lock:
            if not link.closed:
                self.live.append(link)
                return
        self.retire(link)

    def retire(self, link: GroupLink) -> None:
        """A link closed: forget it, keep its description for ``GET /data_plane``."""
        with self._lock:
            if link in self.live:
                self.live.remove(link)
            self.closed.append(link.describe())

    def close_pending(self) -> None:
        """Close every rendezvous still waiting for its peer (at the start of the drain)."""
        for link in list(self.live):
            if link.pending:
                link.close("shutdown")

    def close_all(self) -> None:
        """Close every live group (at shutdown)."""
        for link in list(self.live):
            link.close("shutdown")

    def describe(self) -> dict[str, Any]:
        with self._lock:
            live, closed = [lk.describe() for lk in self.live], list(self.closed)
        return {
            "offered": self.offered,
            "ports": "-".join(map(str, self.ports.range)) if self.ports.range else "ephemeral",
            "timeout": self.settings.data_plane_timeout,
            "links": live,
            "recently_closed": closed,
            "resend": self.kept.describe(),
            "sends_in_flight": self.sends.value,
        }


def close_link(session: Session, state: str = "closed") -> None:
    """Close the session's group, if it has one."""
    link = session.extras.pop(LINK_KEY, None)
    if link is not None:
        link.close(state)


# -- /generate on a group ----------------------------------------------------------------


class GroupTransfer(Transfer):
    """A ``/generate`` answer on the session's group: JSON metadata with the echo, then the tensors.

    Without a working group the answer is a plain wire blob without the echo, which tells the
    client to fall back. The result is kept as the session's last result for
    ``/data_plane/resend``, within the server's resend budget; host tensors live in the
    server's pooled host memory.
    """

    def __init__(self, session: Session, seq: int, link: GroupLink | None, buffers: ServerBuffers) -> None:
        self.session, self.seq, self.link, self.buffers = session, seq, link, buffers

    @property
    def on_device(self) -> bool:
        return self.link is not None and self.link.tier == protocol.TIER_NCCL

    def prepare(self, supervision: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return device_ready(supervision) if self.on_device else self.buffers.to_host(supervision)

    async def send(
        self,
        request: Request,
        supervision: dict[str, torch.Tensor],
        ticket: Ticket | None,
        headers: Mapping[str, str] | None,
    ) -> str:
        link = self.link
        old = self.session.extras.pop(RESULT_KEY, None)
        if old is not None:
            old.close()
        if link is None or not await link.wait_ready() or link.closed:
            if self.on_device:
                supervision = await asyncio.to_thread(self.buffers.to_host, supervision)
            await send_wire(request, supervision, ticket, headers)
            return protocol.TIER_WIRE
        stored = StoredResult(self.seq, supervision, headers, nbytes=_nbytes(supervision))
        if link.kept is not None:
            link.kept.keep(stored)
        self.session.extras[RESULT_KEY] = stored
        meta = TransferMetadata.describe(self.seq, link.tier, supervision)
        body = orjson.dumps(meta.to_json())
        if ticket is not None:
            ticket.encoded()
        response = await request.respond(
            content_type=protocol.JSON,
            headers={**(headers or {}), protocol.TRANSFER_HEADER: str(self.seq), "content-length": str(len(body))},
        )
        await response.send(body, end_stream=True)
        # Only once the metadata is on its way: a send into a dead HTTP exchange would
        # otherwise wait for a receiver that never comes. A link closed in the meantime
        # refuses the send; the client then recovers from the stored result.
        sending = link.send(self.seq, supervision)
        if request.conn_info is not None:  # see connection_closed
            request.conn_info.ctx.data_plane_send = (link, self.seq, sending)
        if ticket is not None:
            ticket.sent(meta.total_bytes)
        return link.tier


def connection_closed(conn_info: Any) -> None:
    """The HTTP connection of a session closed: if it had a transfer still being sent, drop the group.

    Our client keeps its connection open while it receives on the group, so a connection
    the client closes under a transfer in flight means the client is gone (killed, or its host).
    NCCL has no way to notice a dead peer before the transfer deadline; closing the link
    aborts it at once. (A gloo send notices a dead peer's closed sockets by itself, and a
    frozen but living peer only at the deadline: gloo sends cannot be interrupted.)
    """
    pending = getattr(conn_info.ctx, "data_plane_send", None)
    if pending is None:
        return
    link, seq, sending = pending
    conn_info.ctx.data_plane_send = None
    # Only a close the peer made (Sanic marks the connection lost before this signal); the
    # server's own closes (keep-alive timeout, shutdown) say nothing about the client.
    if getattr(conn_info, "lost", False) and not sending.done() and not link.closed:
        logger.warning(
            "data plane %s port %d (%s): the client's connection closed while transfer %d was being sent; "
            "dropping the group",
            link.tier,
            link.port,
            link.client or "anonymous",
            seq,
        )
        link.stats.last_error = f"transfer {seq}: the client's HTTP connection closed during the send"
        link.close("peer gone")


def _nbytes(tensors: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())
