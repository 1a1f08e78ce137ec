"""Our process-group data planes, server side: one private NCCL or gloo group per session.

Why per session: every data-parallel rank of a trainer registers its own session, so each
gets its own group and sender thread. Sends never run on the model thread or the event
loop, so one client's slow or broken transfer delays nobody else by more than the forward
they share.

Protocol (names in :mod:`eagle3_client.protocol`):

* ``POST /session`` replies with ``"data_planes"``: the tiers this server offers, and
  ``"gpu_uuids"``: the GPU its NCCL end uses (a client on that GPU stays off NCCL).
* ``POST /data_plane`` ``{"tier": "gloo"|"nccl", "proof": true}``: the server (rank 0) opens a
  rendezvous store on a port from ``--data-plane-ports`` (the kernel's choice when unset) and
  replies ``{"tier", "port", "key", "nonce", "timeout", "secret"}``. In the background it
  builds its end of the group (store keys under ``key``), waits for the client's first
  message, the ``secret`` (:func:`eagle3_client.transports.transfer.check_proof`: a peer that cannot
  prove it owns the session gets nothing, and the group and its port are closed), closes
  the store, and sends a zero-tensor hello numbered ``nonce``, which the client checks. A
  client that does not ask for the proof (an older one) is refused (``422``, it stays on the
  wire) unless ``--allow-unproven-joins`` lets it in: then it gets the hello at once and no
  ``secret``. ``{"tier": "wire"}`` tears the session's group down.
* ``/generate`` with ``X-Eagle3-Transfer: <seq>``: the answer is the transfer's metadata (JSON,
  header echoed) and the tensors follow on the group (framing in :mod:`eagle3_client.transports.transfer`).
  The result is kept as the session's last result. If the session has no working group the
  answer is a plain wire blob without the echo, which tells the client to fall back.
* ``POST /data_plane/resend`` ``{"seq": n}``: the stored result of transfer ``n`` as a wire
  blob, so a broken transfer costs no second forward. Results are kept within
  ``--resend-budget-mb`` (:class:`~eagle3_appliance.dataplanes.resend_store.ResendStore`); a
  result dropped for the budget answers ``RESEND_CONFLICT_STATUS`` and the client sends its ``/generate`` again.
* ``GET /data_plane``: every group's state and counters (JSON).

A failed or timed-out send tears the group down on this side; the peer's end then fails
too (gloo closes its sockets, NCCL is aborted). Each link's sender is a daemon thread, so
a send stuck on a frozen peer holds neither the event loop nor the process at exit; the
drain waits for sends in flight like for requests (:mod:`eagle3_appliance.ops.lifecycle`).

The HTTP endpoints are in :mod:`eagle3_appliance.serving.dataplane_routes`; this module holds the
state they share (:class:`DataPlaneServer`) and :class:`GroupTransfer`, the ``/generate``
answer on a group. One group's end is :class:`eagle3_appliance.dataplanes.group_link.GroupLink`; the
rendezvous ports come from :class:`eagle3_appliance.dataplanes.port_pool.PortPool`.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import Mapping
from typing import Any

import orjson
import torch
from sanic import Request

from eagle3_appliance.core.admission import Ticket
from eagle3_appliance.core.sessions import Session
from eagle3_appliance.dataplanes.buffers import ServerBuffers
from eagle3_appliance.dataplanes.group_link import PROOF_TIMEOUT_S, GroupLink, SendCounter
from eagle3_appliance.dataplanes.port_pool import PortPool
from eagle3_appliance.dataplanes.resend_store import ResendStore, StoredResult
from eagle3_appliance.dataplanes.transfer import Transfer, device_ready, send_wire
from eagle3_appliance.errors import ApplianceError, InvalidRequest
from eagle3_appliance.settings import Settings, parse_port_range
from eagle3_client import protocol
from eagle3_client.transports.gpu_identity import cuda_uuid
from eagle3_client.transports.transfer import (
    PROOF_BYTES,
    Group,
    RendezvousStore,
    TransferMetadata,
    check_proof,
    gloo_available,
    nccl_available,
    open_group,
    send_transfer,
)

__all__ = [
    "LINK_KEY",
    "RESULT_KEY",
    "DataPlaneServer",
    "GroupTransfer",
    "ProofRequired",
    "TierNotOffered",
    "close_link",
    "connection_closed",
]

logger = logging.getLogger(__name__)

LINK_KEY = "data_plane"  # session.extras: the session's GroupLink
RESULT_KEY = "last_result"  # session.extras: the StoredResult of its last group transfer
_NONCE_LIMIT = 2**52  # hello numbers stay exact in any JSON reader
_KEEP_CLOSED = 32  # closed links listed by GET /data_plane, newest last


class TierNotOffered(ApplianceError):
    status_code = 409


class ProofRequired(InvalidRequest):
    """A group join without the proof of owning the session, on a server that requires it."""


def _our_frame(group: Group, seq: int, tensors: Mapping[str, torch.Tensor], timeout: float) -> int:
    return send_transfer(group, seq, list(tensors.values()), timeout)


# -- the server-wide part ----------------------------------------------------------------


class DataPlaneServer:
    """What the data-plane handlers share: the offered tiers, the port pool, the live links,
    the answers kept for resends and the count of sends in flight."""

    def __init__(
        self,
        settings: Settings,
        offered: list[str],
        device: torch.device,
        ports: PortPool,
        gpu_uuids: tuple[str, ...] = (),
    ) -> None:
        self.settings = settings
        self.offered = offered
        self.device = device
        self.gpu_uuids = gpu_uuids  # the GPU of the NCCL end, told to clients (protocol.GPU_UUIDS_KEY)
        self.ports = ports
        self.kept = ResendStore(settings.resend_budget_mb << 20)
        self.sends = SendCounter()
        self.live: list[GroupLink] = []
        self.closed: deque[dict[str, Any]] = deque(maxlen=_KEEP_CLOSED)  # descriptions only: nothing stays referenced
        self._closing: list[GroupLink] = []  # closed, their threads still dropping the group
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
        if settings.allow_unproven_joins and len(offered) > 1:
            logger.warning(
                "--allow-unproven-joins: clients may join a data-plane group without proving they own the "
                "session; anyone who reaches the rendezvous ports (%s) can race them into their group",
                settings.data_plane_ports or "chosen by the kernel",
            )
        uuid = cuda_uuid(device)  # None on the CPU, or when neither CUDA nor NVML can name it
        if uuid is not None:
            logger.info("data planes %s; the NCCL end is on GPU %s", offered, uuid)
        gpu_uuids = (uuid,) if uuid is not None else ()
        return cls(settings, offered, device, PortPool(parse_port_range(settings.data_plane_ports)), gpu_uuids)

    def group_device(self, tier: str) -> torch.device:
        return self.device if tier == protocol.TIER_NCCL else torch.device("cpu")

    async def open_link(self, session: Session, tier: str, *, proof: bool) -> tuple[GroupLink, int, str, str | None]:
        """Open a store, start the rendezvous in the background; the link, its hello nonce, its key and secret.

        Anyone who reaches the store's port can read the keys, so ``key`` is only a namespace.
        With ``proof`` the peer must send ``secret`` (known only from the HTTP reply) as its
        first message before the server sends it anything; the store is closed right after.
        Without ``proof`` (a client older than the proof) the join is refused unless
        ``--allow-unproven-joins``: a stranger who reads the keys could win the race to the group.
        """
        if not proof and not self.settings.allow_unproven_joins:
            raise ProofRequired(
                'POST /data_plane needs "proof": true (this server admits only a peer that proves it owns the '
                "session; start it with --allow-unproven-joins for older clients): answers stay on the wire"
            )
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
            self._closing = [lk for lk in self._closing if not lk.join(0)] + [link]

    def wait_closed(self, timeout: float) -> bool:
        """At exit: wait up to ``timeout`` s for closed links to drop their groups; True if all did."""
        deadline = time.monotonic() + timeout
        with self._lock:
            closing = list(self._closing)
        return all([link.join(deadline - time.monotonic()) for link in closing])

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

    def __init__(
        self,
        session: Session,
        seq: int,
        link: GroupLink | None,
        buffers: ServerBuffers,
        requested: str | None = None,
    ) -> None:
        self.session, self.seq, self.link, self.buffers = session, seq, link, buffers
        # The tier of the session's group, closed or not; "group" when the session has none left.
        self.requested = requested or (link.tier if link is not None else "group")

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
        if link is None or not await link.wait_ready():
            if self.on_device:
                supervision = await asyncio.to_thread(self.buffers.to_host, supervision)
            await send_wire(request, supervision, ticket, headers)
            return protocol.TIER_WIRE
        meta = TransferMetadata.describe(self.seq, link.tier, supervision)
        stored = StoredResult(self.seq, supervision, headers, nbytes=meta.total_bytes)
        if link.kept is not None:
            link.kept.keep(stored)
        self.session.extras[RESULT_KEY] = stored
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
