"""The data-plane endpoints: ``/data_plane`` (ours, per session) and ``/init_nccl`` (upstream's).

Protocol and state are in :mod:`eagle3_appliance.dataplanes.group_plane` and
:mod:`eagle3_appliance.dataplanes.upstream_nccl`; these handlers only decode the request and call them.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from sanic import Blueprint, Request
from sanic.response import HTTPResponse, json

from eagle3_appliance.dataplanes import upstream_nccl
from eagle3_appliance.dataplanes.group_plane import LINK_KEY, RESULT_KEY, TierNotOffered, close_link
from eagle3_appliance.dataplanes.resend_store import NoStoredResult
from eagle3_appliance.dataplanes.transfer import send_wire
from eagle3_appliance.errors import MalformedBody, NotConfigured
from eagle3_appliance.serving.state import request_session, serving_state
from eagle3_appliance.serving.validation import json_body, json_object
from eagle3_client import protocol
from eagle3_client.protocol import DataPlaneReply, DataPlaneRequest, ResendRequest

__all__ = ["blueprint"]

logger = logging.getLogger(__name__)

blueprint = Blueprint("data_planes")


@blueprint.post(protocol.path(protocol.EP_DATA_PLANE))
async def set_data_plane(request: Request) -> HTTPResponse:
    """Bring up (or, with ``"wire"``, tear down) the calling session's group."""
    session = request_session(request)
    if session.anonymous:
        raise NotConfigured(
            "register with POST /session before asking for a data plane (upstream clients use /init_nccl)"
        )
    wanted = json_body(request.body, DataPlaneRequest.from_json)
    tier = wanted.tier
    close_link(session, "replaced" if tier != protocol.TIER_WIRE else "closed")
    if tier == protocol.TIER_WIRE:
        return json(DataPlaneReply(protocol.TIER_WIRE).to_json())
    plane = serving_state(request).planes
    if tier not in plane.offered:
        raise TierNotOffered(f"this server offers {plane.offered}, not {tier!r}")
    link, nonce, key, secret = await plane.open_link(session, tier, proof=wanted.proof)
    session.extras[LINK_KEY] = link
    logger.info("data plane %s for %s: rendezvous on port %d", tier, session.client or session.id, link.port)
    reply = DataPlaneReply(tier, port=link.port, key=key, nonce=nonce, timeout=link.timeout, secret=secret)
    return json(reply.to_json())


@blueprint.get(protocol.path(protocol.EP_DATA_PLANE))
async def data_plane_status(request: Request) -> HTTPResponse:
    """Offered tiers, ports, live groups, the last closed ones and the answers kept for resends
    (plus the caller's own group, if it names its session)."""
    body: dict[str, Any] = serving_state(request).planes.describe()
    if request.headers.get(protocol.SESSION_HEADER):
        link = request_session(request).extras.get(LINK_KEY)
        body["session"] = link.describe() if link is not None else {"tier": protocol.TIER_WIRE, "state": "none"}
    return json(body)


@blueprint.post(protocol.path(protocol.EP_DATA_PLANE_RESEND))
async def resend(request: Request) -> None:
    """The session's stored result of transfer ``seq`` as a wire blob; never a second forward."""
    session = request_session(request)
    seq = json_body(request.body, ResendRequest.from_json, error=MalformedBody).seq
    stored = session.extras.get(RESULT_KEY)
    if stored is not None and stored.seq == seq and stored.dropped:
        raise NoStoredResult(f"the stored result of transfer {seq} was dropped: {stored.dropped}; send /generate again")
    if stored is None or stored.seq != seq or not stored.tensors:
        held = None if stored is None else stored.seq
        raise NoStoredResult(f"no stored result for transfer {seq} (holding {held}); send /generate again")
    tensors = stored.tensors  # held here: the budget may drop the stored copy while it is being sent
    buffers = serving_state(request).buffers
    await send_wire(request, await asyncio.to_thread(buffers.to_host, tensors), None, stored.headers)


@blueprint.post(protocol.path(protocol.EP_INIT_NCCL))
async def init_nccl(request: Request) -> HTTPResponse:
    """Upstream's NCCL group (CUDA only); "disabled" sends upstream clients to the wire body."""
    state = serving_state(request)
    body = json_object(request.body)
    return json(await upstream_nccl.init_nccl(state.planes, request_session(request), body, state.settings.port))
