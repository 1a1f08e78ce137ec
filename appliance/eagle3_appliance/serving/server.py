"""The Sanic application: upstream's endpoints, our extensions, and the server's lifecycle.

Handlers here only decode what the HTTP layer gives them and call one step below:
``/generate`` is :meth:`eagle3_appliance.serving.pipeline.Pipeline.generate`; the data-plane endpoints
are in :mod:`eagle3_appliance.serving.dataplane_routes`; probes, metrics, auth and the drain are wired
by :mod:`eagle3_appliance.serving.operations`. One process, one event loop; model work runs on the
pipeline's one model thread, so ``GET /health`` is answered while a long forward runs.
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import Any

import torch
from sanic import Blueprint, Request, Sanic
from sanic.response import HTTPResponse, json

from eagle3_appliance.core.inputs import VocabMapping
from eagle3_appliance.core.sessions import SessionRegistry
from eagle3_appliance.dataplanes import upstream_nccl
from eagle3_appliance.dataplanes.buffers import ServerBuffers
from eagle3_appliance.dataplanes.group_plane import DataPlaneServer, connection_closed
from eagle3_appliance.dataplanes.transfer import host_copy, send_wire
from eagle3_appliance.errors import InvalidRequest, MalformedBody, Unavailable, install_error_handler
from eagle3_appliance.model import capture as captures
from eagle3_appliance.model.target import Target
from eagle3_appliance.model.vlm import image_token_id
from eagle3_appliance.ops.lifecycle import install_second_signal_exit
from eagle3_appliance.serving import dataplane_routes, queue_routes, stream_routes
from eagle3_appliance.serving.connections import GuardedHttpProtocol, raise_fd_limit
from eagle3_appliance.serving.negotiation import (
    EncodingError,
    check_mapping,
    choose_encoding,
    granted_capabilities,
    offered_encodings,
)
from eagle3_appliance.serving.operations import install_operations
from eagle3_appliance.serving.pipeline import Pipeline
from eagle3_appliance.serving.state import ServingState, request_session, serving_state
from eagle3_appliance.serving.validation import decode_body, json_body, validate_row_request, validate_vocab_mapping
from eagle3_appliance.settings import Settings
from eagle3_appliance.stream.queue import RunQueues
from eagle3_client import protocol
from eagle3_client.encodings import parse_encoding
from eagle3_client.protocol import ModelInfoExtension, SessionOffer, SessionReply

__all__ = ["create_app", "run_server"]

logger = logging.getLogger(__name__)

# At exit, how long to wait for closed data-plane groups to finish their teardown.
LINK_CLOSE_WAIT_S = 5.0

control = Blueprint("control")


@control.get(protocol.path(protocol.EP_HEALTH))
async def health(request: Request) -> HTTPResponse:
    return json({"status": "ok"})


@control.route(protocol.path(protocol.EP_MODEL_INFO), methods=["GET", "POST"])
async def model_info(request: Request) -> HTTPResponse:
    """Upstream's four keys; a registered session also gets our extension object."""
    state = serving_state(request)
    body: dict[str, Any] = state.target.model_info()
    if request.headers.get(protocol.SESSION_HEADER):
        request_session(request)  # 410 for a session that is gone
        body[protocol.MODEL_INFO_EXTENSION_KEY] = _model_info_extension(state).to_json()
    return json(body)


def _model_info_extension(state: ServingState) -> ModelInfoExtension:
    target, settings = state.target, state.settings
    return ModelInfoExtension(
        model=settings.model,
        dtype=str(target.dtype).removeprefix("torch."),
        device=str(target.device),
        logits_size=target.logits_size,
        max_seq_len=state.pipeline.limits.max_seq_len,
        max_batch_tokens=state.pipeline.limits.max_batch_tokens,
        mode=target.mode,
        fingerprint=target.fingerprint,
    )


@control.post(protocol.path(protocol.EP_INPUT_EMBEDDINGS))
async def input_embeddings(request: Request) -> None:
    state = serving_state(request)
    weight = await state.pipeline.runner.run(lambda: host_copy({"weight": state.target.input_embeddings}))
    await send_wire(request, weight)


@control.post(protocol.path(protocol.EP_SESSION))
async def register_session(request: Request) -> HTTPResponse:
    """Extension: start a session. The body is the client's offer (JSON object, may be empty)."""
    state = serving_state(request)
    offer = json_body(request.body, SessionOffer.from_json)
    try:  # DFlash, DSpark: any layer set this model has, named and checked once per session
        capture = offer.capture.checked(state.target.num_hidden_layers)
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None
    refusal = captures.capture_refusal(state.target, capture)
    if refusal is not None:
        raise InvalidRequest(f"this server cannot serve the {capture.label} capture: {refusal}")
    lease = _requested_lease(offer.lease_seconds, state.settings)
    offered = offered_encodings(offer)
    wants_hidden = any(e.kind == protocol.ENCODING_HIDDEN for e in offered)
    refusal = await state.pipeline.runner.run(state.target.hidden_refusal) if wants_hidden else None
    encoding, refused = choose_encoding(offered, refusal)
    if len(state.sessions.registered()) >= state.settings.max_sessions:
        raise Unavailable(
            f"this server already holds {state.settings.max_sessions} client sessions (--max-sessions); "
            "disconnect unused ones or retry once a lease has run out",
            headers={"Retry-After": str(math.ceil(state.settings.lease_seconds))},
        )
    session = state.sessions.register(client=offer.client)
    session.encoding = encoding.name
    session.lease_seconds = lease
    session.capture = capture
    if not capture.is_eagle3:
        logger.info("session %s (%s): capture %s of layers %s", session.id, offer.client, capture.label, capture.layers)
    session.capabilities = granted_capabilities(offer, state.target)
    if offer.rejoin:
        state.pipeline.metrics.readmissions.inc()
    reply = SessionReply(
        session_id=session.id,
        encoding=session.encoding,
        data_planes=tuple(state.planes.offered),
        lease_seconds=lease or state.settings.lease_seconds,
        encoding_refused=refused,
        model_fingerprint=state.target.fingerprint,
        request_timeout=state.settings.request_timeout,
        capture=capture,
        capabilities=tuple(c for c in protocol.CAPABILITIES if c in session.capabilities),
        gpu_uuids=state.planes.gpu_uuids,
        image_token_id=image_token_id(state.target.model) if capture.is_vlm else None,
    )
    return json(reply.to_json())


def _requested_lease(value: float | None, settings: Settings) -> float | None:
    """The lease granted for a client's ``"lease_seconds"``: at most ``--max-lease-seconds`` (422
    beyond), at least ``--min-lease-seconds`` (a shorter one is raised to it, so a client asking
    for 1 ms does not send thousands of heartbeats a second). None: the server's default."""
    if value is None:
        return None
    if not 0 < value <= settings.max_lease_seconds:
        raise InvalidRequest(f"lease_seconds must be a number in (0, {settings.max_lease_seconds:g}], got {value:g}")
    return max(value, settings.min_lease_seconds)


@control.post(protocol.path(protocol.EP_SET_VOCAB_MAPPING))
async def set_vocab_mapping(request: Request) -> HTTPResponse:
    state = serving_state(request)
    session = request_session(request)
    if state.target.eagle3_refusal is not None:  # the mapping is EAGLE-3's; fail an upstream client at setup
        raise InvalidRequest(f"this server cannot serve the eagle3 capture: {state.target.eagle3_refusal}")
    mapping = validate_vocab_mapping(decode_body(request.body), logits_size=state.target.logits_size)
    check_mapping(parse_encoding(session.encoding), mapping)
    version = _mapping_version(request, session.anonymous)

    def install() -> None:
        # On the model thread, so a forward in flight finishes with the mapping it started with.
        session.mapping = VocabMapping(
            mapping.selected_token_ids.to(state.target.device),
            mapping.selected_token_mask.to(state.target.device),
            version,
        )

    await state.pipeline.runner.run(install)
    return json({"status": "ok"})


def _mapping_version(request: Request, anonymous: bool) -> int | None:
    """The client's number for this mapping (``X-Eagle3-Mapping``), echoed on every answer computed under it."""
    header = request.headers.get(protocol.MAPPING_VERSION_HEADER)
    if header is None or anonymous:
        return None
    try:
        version = int(header)
    except ValueError:
        raise MalformedBody(f"{protocol.MAPPING_VERSION_HEADER} must be an integer, got {header!r}") from None
    if not 0 <= version < 2**62:
        raise MalformedBody(f"{protocol.MAPPING_VERSION_HEADER} must be in [0, 2**62), got {version}")
    return version


@control.post(protocol.path(protocol.EP_GENERATE))
async def generate(request: Request) -> None:
    await serving_state(request).pipeline.generate(request, request_session(request))


@control.post(protocol.path(protocol.EP_LM_HEAD_ROWS))
async def lm_head_rows(request: Request) -> None:
    """Extension: the LM head's rows for a draft vocabulary, for clients on the "hidden" encoding;
    for a DFlash session, any rows of it (its client fetches the whole head, chunk by chunk)."""
    state = serving_state(request)
    session = request_session(request)
    ids = validate_row_request(decode_body(request.body), logits_size=state.target.logits_size)

    def rows() -> dict[str, torch.Tensor]:
        if not session.capture.is_eagle3:
            refusal = captures.lm_head_refusal(state.target)
            if refusal is not None:
                raise InvalidRequest(f"the LM head cannot be sent: {refusal}")
            return {"weight": captures.lm_head_rows(state.target, ids)}
        refusal = state.target.hidden_refusal()
        if refusal is not None:
            raise EncodingError(f"'hidden' is not available for this model: {refusal}")
        return {"weight": state.target.lm_head_rows(ids)}

    await send_wire(request, await state.pipeline.runner.run(rows))


@control.post(protocol.path(protocol.EP_HEARTBEAT))
async def heartbeat(request: Request) -> HTTPResponse:
    request_session(request)  # renews the session's lease; 410 if it is gone
    return json({"status": "ok"})


@control.post(protocol.path(protocol.EP_DISCONNECT))
async def disconnect(request: Request) -> HTTPResponse:
    # Ends only the caller's session: unlike upstream's server, one client leaving does not
    # stop a server that others share. The anonymous session is never dropped.
    session_id = request.headers.get(protocol.SESSION_HEADER)
    if session_id:
        serving_state(request).sessions.drop(session_id)
    else:
        upstream_nccl.close(request_session(request))  # an upstream client leaves: its NCCL group goes too
    return json({"status": "ok"})


def create_app(settings: Settings, target: Target, name: str = "eagle3_appliance") -> Sanic:
    """Build the application around an already-loaded target."""
    app = Sanic(name, configure_logging=False)
    app.config.REQUEST_MAX_SIZE = settings.max_body_bytes
    # A forward of a long batch on a big model can take minutes; the client has its own timeout.
    app.config.RESPONSE_TIMEOUT = 24 * 3600
    # Header and body deadlines, the connection cap and keep-alive: eagle3_appliance.serving.connections.
    app.config.KEEP_ALIVE_TIMEOUT = math.ceil(settings.keep_alive_timeout)
    app.config.NOISY_EXCEPTIONS = False
    sessions = SessionRegistry()
    planes = DataPlaneServer.create(settings, target.device)
    logger.info("model fingerprint %s (mode %s)", target.fingerprint, target.mode)  # computed once, here

    # Shutdown listeners run in reverse order of registration: the groups close only after
    # the drain (registered by install_operations below) has let in-flight answers finish.
    @app.before_server_stop
    async def _close_links(app: Sanic) -> None:
        planes.close_all()

    ops = install_operations(app, settings, sessions)
    ops.target_faults = target.faults  # a failed tensor-parallel rank makes the server not ready
    ops.metrics.describe_target(target.mode, settings.loader.value, settings.attn_implementation or "default")
    ops.lifecycle.transfers = lambda: planes.sends.value  # answers still being sent count as work

    # Registered after the drain, so it runs before it: a rendezvous still waiting for its
    # peer is not work to wait for (its client falls back), and must not hold the exit.
    @app.before_server_stop
    async def _close_pending(app: Sanic) -> None:
        planes.close_pending()

    @app.signal("http.lifecycle.complete")
    async def _connection_closed(conn_info: Any, **_: Any) -> None:
        connection_closed(conn_info)  # a client gone under a group transfer: drop its group now

    buffers = ServerBuffers(target.device, settings.buffer_pool_mb << 20)
    pipeline = Pipeline(settings, target, buffers, ops.admission, ops.metrics, kept=planes.kept)
    logger.info("limits: %s", pipeline.limits.describe())
    threads = pipeline.runner.intra_op_threads()
    ops.metrics.intra_op_threads.set(threads)
    logger.info(
        "intra-op threads: %d per forward (--intra-op-threads %d; 0 = torch's default)",
        threads,
        settings.intra_op_threads,
    )
    ops.metrics.describe_limits(
        {
            "max_queue": lambda: settings.max_queue,
            "max_sessions": lambda: settings.max_sessions,
            "max_connections": lambda: ops.connections.max_connections,
            "max_body_bytes": lambda: settings.max_body_bytes,
            "max_pending_body_bytes": lambda: settings.max_pending_body_bytes,
            "max_seq_len": lambda: pipeline.limits.max_seq_len,
            "max_batch_tokens": lambda: pipeline.limits.max_batch_tokens,
        }
    )
    queues = RunQueues(queue_routes.MetricsObserver(ops.metrics))
    app.ctx.state = ServingState(settings, target, sessions, buffers, planes, pipeline, queues=queues)
    app.blueprint(control)
    app.blueprint(dataplane_routes.blueprint)
    app.blueprint(stream_routes.blueprint)
    app.blueprint(queue_routes.blueprint)
    install_error_handler(app)

    @app.after_server_stop
    async def _release(app: Sanic) -> None:
        if not ops.lifecycle.forced:  # a group still being dropped must not race the exit
            await asyncio.to_thread(planes.wait_closed, LINK_CLOSE_WAIT_S)
        pipeline.runner.shutdown(wait=not ops.lifecycle.forced)

    return app


def run_server(app: Sanic, settings: Settings) -> int:
    """Serve until SIGINT/SIGTERM (or idle, with --exit-when-idle), in this process; the exit code.

    Sanic's single-process mode turns SIGTERM/SIGINT into a stop; the drain
    (:mod:`eagle3_appliance.ops.lifecycle`) runs before the listener closes.
    """
    app.config.GRACEFUL_SHUTDOWN_TIMEOUT = settings.grace_period
    app.ctx.ops.connections.limit_to_descriptors(raise_fd_limit())
    app.prepare(
        host=settings.host,
        port=settings.port,
        single_process=True,
        access_log=False,
        motd=False,
        protocol=GuardedHttpProtocol,
    )
    Sanic.serve_single(app)
    install_second_signal_exit()  # the loop is gone; a second signal still ends the process at once
    lifecycle = app.ctx.ops.lifecycle
    lifecycle.exit_now_if_forced()
    return int(lifecycle.exit_code())
