"""Upstream's NCCL data plane (``/init_nccl`` + ``X-NeMo-NCCL: 1``) for unmodified upstream clients.

Kept apart from our own tiers because its rules are upstream's, not ours: one group per
server (on the anonymous session, which upstream clients share), the rendezvous port chosen
by the client (``{"nccl_port": p}``; default ``NEMO_EAGLE_NCCL_PORT`` or HTTP port + 100), no
sequence numbers, and each tensor sent with its own dtype except int16/int8/bool, which
travel as uint8 views. Upstream builds its group with torch's group helper under the name
``nemo_eagle_target_transfer_<port>``, so its NCCL keys live in the store under
``"<name>/cuda/"``; we build ``ProcessGroupNCCL`` on the same prefix and need no sglang.

Without CUDA (or with ``NEMO_EAGLE_ENABLE_NCCL=0``, or nccl left out of ``--data-planes``)
``/init_nccl`` answers ``disabled`` and upstream clients use the wire, as upstream's own
CPU server makes them do.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Mapping
from typing import Any

import orjson
import torch
from sanic import Request

from eagle3_appliance.admission import Ticket
from eagle3_appliance.group_plane import LINK_KEY, DataPlaneServer, GroupLink
from eagle3_appliance.sessions import Session
from eagle3_appliance.transfer import Transfer, device_ready, host_copy, send_wire
from eagle3_client import protocol, wire
from eagle3_client.transfer import Group, host_store, open_group, wait_work

__all__ = ["UPSTREAM_LINK_KEY", "UpstreamTransfer", "close", "init_nccl", "upstream_frame", "upstream_transfer"]

logger = logging.getLogger(__name__)

UPSTREAM_LINK_KEY = "upstream_nccl"  # session.extras: upstream's group (anonymous session)
UPSTREAM_TIMEOUT_S = 120.0  # upstream's rendezvous timeout
_AS_BYTES = (torch.int16, torch.int8, torch.bool)


def _disabled_reason(plane: DataPlaneServer) -> str | None:
    if os.environ.get(protocol.ENV_ENABLE_NCCL, "1") == "0":
        return f"{protocol.ENV_ENABLE_NCCL}=0"
    if protocol.TIER_NCCL not in plane.offered:
        return "nccl is not offered (model not on CUDA, NCCL unavailable, or left out of --data-planes)"
    return None


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
    """``/init_nccl``: bring up upstream's group; ``ok``, ``already_initialized``, ``disabled`` or ``failed``."""
    reason = _disabled_reason(plane)
    if reason is not None:
        logger.info("/init_nccl: disabled (%s); the client uses the wire", reason)
        return {"status": "disabled"}
    link = session.extras.get(UPSTREAM_LINK_KEY)
    if link is not None and not link.closed:
        return {"status": "already_initialized"}
    try:
        port = int(
            body.get("nccl_port") or protocol.upstream_nccl_port(http_port, os.environ.get(protocol.ENV_NCCL_PORT))
        )
    except (TypeError, ValueError):
        return {"status": "failed"}
    device = plane.device
    host = plane.settings.host

    def setup() -> Group:
        # Upstream's server waits for the client to reach the store before answering "ok".
        store = host_store(host, port, UPSTREAM_TIMEOUT_S, multi_tenant=True, wait_for_workers=True)
        prefix = f"{protocol.UPSTREAM_NCCL_GROUP_PREFIX}{port}/cuda/"
        return open_group(protocol.TIER_NCCL, store, 0, UPSTREAM_TIMEOUT_S, device, key_prefix=prefix)

    link = GroupLink(
        protocol.TIER_NCCL, port, plane.settings.data_plane_timeout, setup, upstream_frame, client="upstream"
    )
    try:
        await asyncio.wrap_future(link.ready)
    except Exception as exc:  # noqa: BLE001 - upstream expects a status, not an error
        logger.warning("/init_nccl on port %d failed: %s", port, exc)
        return {"status": "failed"}
    session.extras[UPSTREAM_LINK_KEY] = link
    plane.track(link)
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
        link.send(0, supervision)
        if ticket is not None:
            ticket.sent(sum(t.numel() * t.element_size() for t in supervision.values()))
        return protocol.TIER_NCCL


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
