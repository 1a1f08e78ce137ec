"""Our process-group data planes, server side: one private NCCL or gloo group per session.

Why per session: every data-parallel rank of a trainer registers its own session, so each
gets its own group, rendezvous port and sender thread. Sends never run on the model thread
or the event loop, so one client's slow or broken transfer delays nobody else by more than
the forward they share.

Protocol (names in :mod:`eagle3_client.protocol`):

* ``POST /session`` replies with ``"data_planes"``: the tiers this server offers.
* ``POST /data_plane`` ``{"tier": "gloo"|"nccl"}``: the server (rank 0) opens a rendezvous
  store on a port from ``--data-plane-ports`` (the kernel's choice when unset) and replies
  ``{"tier", "port", "key", "nonce", "timeout"}``; in the background it builds its end of the
  group (store keys under the secret ``key``, so only the session's owner can join) and sends
  a zero-tensor hello numbered ``nonce``, which the client checks. ``{"tier": "wire"}``
  tears the session's group down.
* ``/generate`` with ``X-Eagle3-Transfer: <seq>``: the answer is the transfer's metadata (JSON,
  header echoed) and the tensors follow on the group (framing in :mod:`eagle3_client.transfer`).
  The result is kept as the session's last result. If the session has no working group the
  answer is a plain wire blob without the echo, which tells the client to fall back.
* ``POST /data_plane/resend`` ``{"seq": n}``: the stored result of transfer ``n`` as a wire
  blob, so a broken transfer costs no second forward.
* ``GET /data_plane``: every group's state and counters (JSON).

A failed or timed-out send tears the group down on this side; the peer's end then fails
too (gloo closes its sockets, NCCL is aborted), so a client that vanished mid-transfer
holds a sender thread for at most ``--data-plane-timeout`` seconds and never the server.

The HTTP endpoints are in :mod:`eagle3_appliance.dataplane_routes`; this module holds the
state they share and :class:`GroupTransfer`, the ``/generate`` answer on a group.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
import torch
from sanic import Request

from eagle3_appliance.admission import Ticket
from eagle3_appliance.errors import ApplianceError, Unavailable
from eagle3_appliance.sessions import Session
from eagle3_appliance.settings import Settings, parse_port_range
from eagle3_appliance.transfer import Transfer, device_ready, host_copy, send_wire
from eagle3_client import protocol
from eagle3_client.transfer import (
    Group,
    TransferMetadata,
    gloo_available,
    host_store,
    nccl_available,
    open_group,
    send_transfer,
)

__all__ = [
    "LINK_KEY",
    "RESULT_KEY",
    "DataPlaneServer",
    "GroupLink",
    "GroupTransfer",
    "NoStoredResult",
    "PortPool",
    "StoredResult",
    "TierNotOffered",
    "close_link",
]

logger = logging.getLogger(__name__)

LINK_KEY = "data_plane"  # session.extras: the session's GroupLink
RESULT_KEY = "last_result"  # session.extras: the StoredResult of its last group transfer
_NONCE_LIMIT = 2**52  # hello numbers stay exact in any JSON reader
_KEEP_CLOSED = 32  # closed links listed by GET /data_plane, newest last


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


# -- one session's group -----------------------------------------------------------------


@dataclass
class StoredResult:
    """A session's last group-transfer result, kept so that a broken transfer can be resent over the wire."""

    seq: int
    tensors: dict[str, torch.Tensor]
    headers: Mapping[str, str] | None = None  # of a wire answer of it (the encoding's name)

    def close(self) -> None:
        self.tensors = {}


@dataclass
class LinkStats:
    transfers: int = 0
    bytes: int = 0
    seconds: float = 0.0
    failures: int = 0
    last_error: str | None = None


class GroupLink:
    """This server's end (rank 0) of one group: rendezvous, then sends in order on its own thread.

    ``setup`` builds the :class:`Group` (and says hello) on the link's thread; ``frame`` sends
    one transfer on it. Both the hello protocol and the framing differ for upstream's NCCL
    clients (:mod:`eagle3_appliance.upstream_nccl`), which use this class too.
    """

    def __init__(
        self,
        tier: str,
        port: int,
        timeout: float,
        setup: Callable[[], Group],
        frame: Callable[[Group, int, Mapping[str, torch.Tensor], float], int],
        on_close: Callable[[int], None] = lambda port: None,
        client: str = "",
    ) -> None:
        self.tier, self.port, self.timeout, self.client = tier, port, timeout, client
        self.state = "connecting"
        self.stats = LinkStats()
        self.group: Group | None = None
        self.created = time.time()
        self._frame = frame
        self._on_close = on_close
        self._closed = False
        self._lock = threading.Lock()
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"data-plane-{port}")
        self.ready = self._executor.submit(self._setup, setup)

    @property
    def closed(self) -> bool:
        return self._closed

    def _setup(self, setup: Callable[[], Group]) -> None:
        try:
            group = setup()
        except Exception as exc:
            self._failed(exc, "rendezvous")
            raise
        with self._lock:
            if self._closed:
                group.close()
                raise RuntimeError("the link was closed during its rendezvous")
            self.group = group
            self.state = "ready"

    async def wait_ready(self) -> bool:
        """True once the group is up; False if it failed, was closed, or does not come up in time."""
        if self._closed:
            return False
        try:
            await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(self.ready)), timeout=self.timeout)
        except Exception:  # noqa: BLE001 - any failure means: answer over the wire
            return False
        return not self._closed

    def send(self, seq: int, tensors: Mapping[str, torch.Tensor]) -> concurrent.futures.Future[int]:
        """Queue transfer ``seq`` behind any earlier one of this session."""
        return self._executor.submit(self._send, seq, tensors)

    def _send(self, seq: int, tensors: Mapping[str, torch.Tensor]) -> int:
        group = self.group
        if group is None or self._closed:
            raise RuntimeError(f"the {self.tier} link on port {self.port} is closed")
        start = time.perf_counter()
        try:
            nbytes = self._frame(group, seq, tensors, self.timeout)
        except Exception as exc:
            self._failed(exc, f"transfer {seq}")
            raise
        self.stats.transfers += 1
        self.stats.bytes += nbytes
        self.stats.seconds += time.perf_counter() - start
        return nbytes

    def _failed(self, exc: BaseException, what: str) -> None:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        self.stats.failures += 1
        self.stats.last_error = f"{what}: {text}"[:500]
        logger.warning("data plane %s port %d (%s): %s failed, dropping the group: %s", *self._who(), what, text)
        self.close("failed")

    def _who(self) -> tuple[str, int, str]:
        return self.tier, self.port, self.client or "anonymous"

    def close(self, state: str = "closed") -> None:
        """Tear down this end; safe from any thread, idempotent.

        NCCL is aborted at once (that unblocks a stuck send); a gloo send in flight ends
        with the peer's sockets or its own deadline, and the group is dropped after it.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self.state = state
            group = self.group
        if group is not None and group.tier == protocol.TIER_NCCL:
            group.close()
        try:
            self._executor.submit(self._release)
            self._executor.shutdown(wait=False)
        except RuntimeError:  # already shut down
            self._release()

    def _release(self) -> None:
        group, self.group = self.group, None
        if group is not None:
            group.close()
        self._on_close(self.port)

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


def _our_frame(group: Group, seq: int, tensors: Mapping[str, torch.Tensor], timeout: float) -> int:
    return send_transfer(group, seq, list(tensors.values()), timeout)


# -- the server-wide part ----------------------------------------------------------------


@dataclass
class DataPlaneServer:
    """What the data-plane handlers share: the offered tiers, the port pool, the settings."""

    settings: Settings
    offered: list[str]
    device: torch.device
    ports: PortPool
    links: list[GroupLink] = field(default_factory=list)

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

    async def open_link(self, session: Session, tier: str) -> tuple[GroupLink, int, str]:
        """Open a store, start the rendezvous in the background; the link, its hello nonce and its key.

        The group's keys live under a random prefix that only the session's owner learns (in
        the authenticated HTTP reply), so a stranger who reaches the store port cannot join.
        """
        timeout = self.settings.data_plane_timeout
        store, port = await asyncio.to_thread(self.ports.open_store, self.settings.host, timeout)
        nonce = secrets.randbelow(_NONCE_LIMIT - 1) + 1
        key = secrets.token_hex(16)
        device = self.group_device(tier)

        def setup() -> Group:
            group = open_group(tier, store, 0, timeout, device, key_prefix=f"{key}/")
            try:
                send_transfer(group, nonce, [], timeout)  # the hello
            except Exception:
                group.close()
                raise
            return group

        link = GroupLink(tier, port, timeout, setup, _our_frame, self.ports.release, client=session.client)
        self.track(link)
        return link, nonce, key

    def close_all(self) -> None:
        """Close every live group (at shutdown)."""
        for link in self.links:
            link.close("shutdown")

    def track(self, link: GroupLink) -> None:
        """Remember a link; closed ones are kept (the last few) for ``GET /data_plane``."""
        closed = [lk for lk in self.links if lk.closed][-_KEEP_CLOSED:]
        self.links = closed + [lk for lk in self.links if not lk.closed] + [link]


def close_link(session: Session, state: str = "closed") -> None:
    """Close the session's group, if it has one."""
    link = session.extras.pop(LINK_KEY, None)
    if link is not None:
        link.close(state)


# -- /generate on a group ----------------------------------------------------------------


class GroupTransfer(Transfer):
    """A ``/generate`` answer on the session's group: JSON metadata with the echo, then the tensors.

    Without a working group the answer is a plain wire blob without the echo, which tells the
    client to fall back. The result is kept as the session's last result for ``/data_plane/resend``.
    """

    def __init__(self, session: Session, seq: int, link: GroupLink | None) -> None:
        self.session, self.seq, self.link = session, seq, link

    @property
    def on_device(self) -> bool:
        return self.link is not None and self.link.tier == protocol.TIER_NCCL

    def prepare(self, supervision: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return device_ready(supervision) if self.on_device else host_copy(supervision)

    async def send(
        self,
        request: Request,
        supervision: dict[str, torch.Tensor],
        ticket: Ticket | None,
        headers: Mapping[str, str] | None,
    ) -> str:
        link = self.link
        if link is None or not await link.wait_ready():
            self.session.extras.pop(RESULT_KEY, None)
            if self.on_device:
                supervision = await asyncio.to_thread(host_copy, supervision)
            await send_wire(request, supervision, ticket, headers)
            return protocol.TIER_WIRE
        old = self.session.extras.get(RESULT_KEY)
        if old is not None:
            old.close()
        self.session.extras[RESULT_KEY] = StoredResult(self.seq, supervision, headers)
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
        # otherwise wait for a receiver that never comes.
        link.send(self.seq, supervision)
        if ticket is not None:
            ticket.sent(meta.total_bytes)
        return link.tier
