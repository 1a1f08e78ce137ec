"""Upstream's NCCL data plane (``/init_nccl`` + ``X-NeMo-NCCL: 1``) for unmodified upstream clients.

Kept apart from our own tiers because its rules are upstream's, not ours: one group per
server (on the anonymous session, which upstream clients share), the rendezvous port chosen
by the client (``{"nccl_port": p}``; default ``NEMO_EAGLE_NCCL_PORT`` or HTTP port + 100), no
sequence numbers, and each tensor sent with its own dtype except int16/int8/bool, which
travel as uint8 views.

The group is built the way upstream builds it (:func:`upstream_group`): a multi-tenant
``TCPStore`` handed unchanged to torch's ``_new_process_group_helper`` under the group name
``nemo_eagle_target_transfer_<port>``, which is what sglang's ``init_custom_process_group``
does with a given store. The helper nests ``PrefixStore("<name>/")`` and
``PrefixStore("<device>/")``, so the keys live under ``<name>//cuda//...``; going through the
same helper keeps both ends on the same keys whatever torch does there. No sglang needed.

Without CUDA (or with ``NEMO_EAGLE_ENABLE_NCCL=0``, or nccl left out of ``--data-planes``)
``/init_nccl`` answers ``disabled`` and upstream clients use the wire, as upstream's own
CPU server makes them do. The test switch ``--upstream-nccl-on-gloo`` builds the same group
on gloo when the model is on the CPU (tests of this path without a GPU).
"""

from __future__ import annotations

import asyncio
import datetime
import inspect
import logging
import os
import time
from collections.abc import Mapping
from typing import Any

import orjson
import torch
from sanic import Request

from eagle3_appliance.core.admission import Ticket
from eagle3_appliance.core.sessions import Session
from eagle3_appliance.dataplanes.group_link import GroupLink
from eagle3_appliance.dataplanes.group_plane import LINK_KEY, DataPlaneServer
from eagle3_appliance.dataplanes.transfer import Transfer, device_ready, host_copy, send_wire
from eagle3_client import protocol, wire
from eagle3_client.transports.transfer import Group, RendezvousStore, gloo_available, host_store, wait_work

__all__ = [
    "UPSTREAM_LINK_KEY",
    "UpstreamTransfer",
    "close",
    "init_nccl",
    "upstream_frame",
    "upstream_group",
    "upstream_transfer",
]

logger = logging.getLogger(__name__)

UPSTREAM_LINK_KEY = "upstream_nccl"  # session.extras: upstream's group (anonymous session)
UPSTREAM_TIMEOUT_S = 120.0  # upstream's rendezvous timeout
_AS_BYTES = (torch.int16, torch.int8, torch.bool)


def _tier(plane: DataPlaneServer) -> tuple[str | None, str]:
    """The backend of upstream's group on this server, or None and why it is disabled."""
    if os.environ.get(protocol.ENV_ENABLE_NCCL, "1") == "0":
        return None, f"{protocol.ENV_ENABLE_NCCL}=0"
    if protocol.TIER_NCCL in plane.offered:
        return protocol.TIER_NCCL, ""
    if plane.settings.upstream_nccl_on_gloo and plane.device.type == "cpu" and gloo_available():
        return protocol.TIER_GLOO, ""
    return None, "nccl is not offered (model not on CUDA, NCCL unavailable, or left out of --data-planes)"


def upstream_group(tier: str, store: Any, port: int, device: torch.device, timeout: float) -> Group:
    """Rank 0 of upstream's group, built through torch's helper exactly as upstream's client builds rank 1.

    Like sglang, the group is registered in torch's world (``pg_group_ranks``) so that
    ``torch.distributed.send/recv(group=...)`` accept it; closing the :class:`Group` removes it
    again, so the next client may reuse the group name.
    """
    from torch.distributed.distributed_c10d import Backend, _new_process_group_helper, _world

    name = f"{protocol.UPSTREAM_NCCL_GROUP_PREFIX}{port}"
    for stale, stale_name in list(_world.pg_names.items()):
        if stale_name == name:  # left by a closed link whose sender had not finished yet
            _forget(stale)
    if tier == protocol.TIER_NCCL:
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    # The helper's options argument was renamed in torch 2.6 (pg_options -> backend_options).
    options = (
        "backend_options"
        if "backend_options" in inspect.signature(_new_process_group_helper).parameters
        else "pg_options"
    )
    # (a dict: the helper's parameter types differ between torch versions)
    named: dict[str, Any] = {"group_name": name, "timeout": datetime.timedelta(seconds=timeout), options: None}
    pg, _ = _new_process_group_helper(2, 0, [], Backend(tier), store, **named)
    _world.pg_group_ranks[pg] = {0: 0, 1: 1}
    return Group(tier=tier, rank=0, pg=pg, store=store, device=device, timeout=timeout, release=_forget)


def _forget(pg: Any) -> None:
    """Remove a group from torch's world registry (no collective: the peer may be gone)."""
    from torch.distributed.distributed_c10d import _unregister_process_group, _world

    name = _world.pg_names.pop(pg, None)
    if name is None:
        return
    for table in (_world.pg_map, _world.pg_group_ranks, _world.pg_backend_config, _world.pg_to_tag):
        table.pop(pg, None)
    _world.pg_coalesce_state.pop(pg, None)
    for groups in _world.tags_to_pg.values():
        while pg in groups:
            groups.remove(pg)
    try:
        _unregister_process_group(name)
    except Exception:  # noqa: BLE001 - not registered in this torch's C++ registry
        pass


def upstream_frame(group: Group, seq: int, tensors: Mapping[str, torch.Tensor], timeout: float) -> int:
    """Upstream's framing: one send per tensor in key order, int16/int8/bool as uint8 views."""
    deadline = time.monotonic() + timeout
    total = 0
    for key in protocol.SUPERVISION_KEYS:
        tensor = tensors[key]
        if tensor.dtype in _AS_BYTES:
            tensor = tensor.view(torch.uint8)
        work = group.pg.send([tensor], group.peer, 0)
        wait_work(group, work, deadline, f"upstream send of {key}")
        total += tensor.numel() * tensor.element_size()
    return total


async def init_nccl(plane: DataPlaneServer, session: Session, body: dict[str, Any], http_port: int) -> dict[str, str]:
    """``/init_nccl``: bring up upstream's group; ``ok``, ``disabled`` or ``failed``.

    A second ``/init_nccl`` while the group is live answers ``failed``, not upstream's
    ``already_initialized``: every upstream client shares the anonymous session, so the
    caller would be another trainer rank, which must not be paired with this rank's group
    (``failed`` sends it to the wire).
    """
    tier, reason = _tier(plane)
    if tier is None:
        logger.info("/init_nccl: disabled (%s); the client uses the wire", reason)
        return {"status": "disabled"}
    link = session.extras.get(UPSTREAM_LINK_KEY)
    if link is not None and not link.closed:
        logger.warning(
            "/init_nccl while upstream's group on port %d is live: answering 'failed' (the caller uses the wire); "
            "one upstream NCCL client per server",
            link.port,
        )
        return {"status": "failed"}
    try:
        port = int(
            body.get("nccl_port") or protocol.upstream_nccl_port(http_port, os.environ.get(protocol.ENV_NCCL_PORT))
        )
    except (TypeError, ValueError):
        return {"status": "failed"}
    device = plane.device
    host = plane.settings.host
    store = RendezvousStore(None, UPSTREAM_TIMEOUT_S)

    def setup(link: GroupLink) -> Group:
        # Upstream's server waits for the client to reach the store before answering "ok".
        store.attach(host_store(host, port, UPSTREAM_TIMEOUT_S, multi_tenant=True, wait_for_workers=True))
        if link.closed:  # closed (shutdown) while waiting for the client
            store.detach()
            raise RuntimeError("the link was closed during its rendezvous")
        return upstream_group(tier, store, port, device, UPSTREAM_TIMEOUT_S)

    link = GroupLink(
        tier,
        port,
        plane.settings.data_plane_timeout,
        setup,
        upstream_frame,
        store=store,
        on_close=plane.retire,
        sends=plane.sends,
        client="upstream",
    )
    session.extras[UPSTREAM_LINK_KEY] = link  # a concurrent /init_nccl now answers "failed"
    plane.track(link)
    if not await asyncio.wrap_future(link.ready):
        session.extras.pop(UPSTREAM_LINK_KEY, None)
        logger.warning("/init_nccl on port %d failed: %s", port, link.stats.last_error)
        return {"status": "failed"}
    return {"status": "ok"}


class UpstreamTransfer(Transfer):
    """A ``/generate`` answered the upstream NCCL way: JSON metadata with the echo, then the sends."""

    def __init__(self, link: GroupLink | None) -> None:
        self.link = link

    def prepare(self, supervision: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return device_ready(supervision) if self.link is not None else host_copy(supervision)

    async def send(
        self,
        request: Request,
        supervision: dict[str, torch.Tensor],
        ticket: Ticket | None,
        headers: Mapping[str, str] | None,
    ) -> str:
        link = self.link
        if link is None or link.closed:
            await send_wire(request, await asyncio.to_thread(host_copy, supervision), ticket, headers)
            return protocol.TIER_WIRE
        metadata = {
            key: {"dtype_code": wire.DTYPE_TO_CODE[t.dtype], "shape": list(t.shape)} for key, t in supervision.items()
        }
        body = orjson.dumps({"keys_order": list(protocol.SUPERVISION_KEYS), "metadata": metadata})
        if ticket is not None:
            ticket.encoded()
        response = await request.respond(
            content_type=protocol.JSON, headers={protocol.NCCL_HEADER: "1", "content-length": str(len(body))}
        )
        await response.send(body, end_stream=True)
        link.send(0, supervision)  # refused (nothing sent) if the link closed meanwhile
        if ticket is not None:
            ticket.sent(sum(t.numel() * t.element_size() for t in supervision.values()))
        return link.tier


def close(session: Session) -> None:
    """Drop upstream's group of this session (its client said goodbye)."""
    link = session.extras.pop(UPSTREAM_LINK_KEY, None)
    if link is not None:
        link.close()


def upstream_transfer(session: Session) -> UpstreamTransfer | None:
    """Upstream's NCCL answer if this session brought up upstream's group, else None (wire)."""
    link = session.extras.get(UPSTREAM_LINK_KEY)
    if link is None or link.closed or session.extras.get(LINK_KEY) is not None:
        return None
    return UpstreamTransfer(link)
