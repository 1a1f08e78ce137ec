"""The Sanic application: upstream's endpoints, lifecycle and the streaming wire response.

Concurrency model. Sanic runs one process with one event loop. Everything that touches the
model (the forward, swapping the vocab mapping) runs on :class:`ModelRunner`, a one-thread
executor: the forward hooks write into one capture slot, so forwards must not overlap, and
a single worker thread gives that ordering without a lock the event loop would block on.
The loop itself only decodes small request bodies and writes response bytes, so
``GET /health`` is answered while a long forward runs.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from sanic import Blueprint, Request, Sanic
from sanic.response import HTTPResponse, json

from appliance import dataplanes, encodings, upstream_nccl
from appliance.admission import Ticket
from appliance.buffers import ServerBuffers, supervise_on_device
from appliance.errors import InvalidTensors, MalformedBody, NotConfigured, install_error_handler
from appliance.microbatch import MicroBatcher
from appliance.operations import install_operations, operations
from appliance.sessions import Session, SessionRegistry
from appliance.settings import Settings
from appliance.target import Target, VocabMapping
from appliance.validation import decode_body, validate_generate, validate_vocab_mapping
from client import protocol, wire
from client.encodings import Encoding, parse_encoding

__all__ = ["ModelRunner", "ServingState", "create_app", "run_server", "send_wire"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Response bodies are written in slices so that the socket's flow control paces us and
# the transport never queues more than about one slice of a large tensor (uvloop queues
# views, not copies). 1 MiB measured fastest on loopback (4.1 GB/s against 3.0 at 4 MiB).
SEND_SLICE_BYTES = 1024 * 1024


class ModelRunner:
    """The one thread that runs model work, in submission order."""

    def __init__(self) -> None:
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def shutdown(self, wait: bool = True) -> None:
        self._executor.shutdown(wait=wait, cancel_futures=not wait)


@dataclass
class ServingState:
    """What the handlers share: the model, its runner, the sessions and the answer buffers."""

    settings: Settings
    target: Target
    runner: ModelRunner = field(default_factory=ModelRunner)
    sessions: SessionRegistry = field(default_factory=SessionRegistry)
    buffers: ServerBuffers = None  # type: ignore[assignment]  # reused answer memory; made from settings
    batcher: MicroBatcher | None = None  # opt-in micro-batching of /generate

    def __post_init__(self) -> None:
        if self.buffers is None:
            self.buffers = ServerBuffers(self.target.device, self.settings.buffer_pool_mb << 20)
        if self.batcher is None and self.settings.microbatch_wait_ms > 0:
            self.batcher = MicroBatcher(
                self.target,
                self.buffers,
                self.runner.run,
                wait_s=self.settings.microbatch_wait_ms / 1000,
                max_tokens=self.settings.microbatch_max_tokens,
            )


def _state(request: Request) -> ServingState:
    return request.app.ctx.state


def _session(request: Request) -> Session:
    return _state(request).sessions.get(request.headers.get(protocol.SESSION_HEADER))


async def send_wire(
    request: Request,
    tensors: Mapping[str, torch.Tensor | None],
    ticket: Ticket | None = None,
    headers: Mapping[str, str] | None = None,
) -> None:
    """Stream a wire blob: each entry header, then the tensor's own memory, no concatenation."""
    parts, total = wire.encode_parts(tensors)
    if ticket is not None:
        ticket.encoded()
    response = await request.respond(
        content_type=protocol.OCTET_STREAM, headers={**(headers or {}), "content-length": str(total)}
    )
    for part in parts:
        view = memoryview(part)
        for start in range(0, view.nbytes, SEND_SLICE_BYTES):
            await response.send(view[start : start + SEND_SLICE_BYTES])
    if ticket is not None:
        ticket.sent(total)


def _to_host(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: t.detach().to("cpu").contiguous() for key, t in tensors.items()}


control = Blueprint("control")


@control.get(protocol.path(protocol.EP_HEALTH))
async def health(request: Request) -> HTTPResponse:
    return json({"status": "ok"})


@control.route(protocol.path(protocol.EP_MODEL_INFO), methods=["GET", "POST"])
async def model_info(request: Request) -> HTTPResponse:
    return json(_state(request).target.model_info())


@control.post(protocol.path(protocol.EP_INPUT_EMBEDDINGS))
async def input_embeddings(request: Request) -> None:
    state = _state(request)
    weight = await state.runner.run(lambda: _to_host({"weight": state.target.input_embeddings}))
    await send_wire(request, weight)


@control.post(protocol.path(protocol.EP_SESSION))
async def register_session(request: Request) -> HTTPResponse:
    """Extension: start a session. The body is the client's offer (JSON object, may be empty)."""
    state = _state(request)
    offer = _json_object(request)
    lease = _requested_lease(offer, state.settings)
    encoding, refused = await _negotiate_encoding(state, offer)
    session = state.sessions.register(client=str(offer.get("client", "")))
    session.encoding = encoding.name
    session.lease_seconds = lease
    reply = {
        "session_id": session.id,
        "protocol": 1,
        "encoding": session.encoding,
        "data_plane": "wire",
        "data_planes": dataplanes.offered(request.app),
        "lease_seconds": lease or state.settings.lease_seconds,
    }
    if refused:
        reply["encoding_refused"] = refused
    return json(reply)


def _requested_lease(offer: dict[str, Any], settings: Settings) -> float | None:
    """The lease a client asks for (``"lease_seconds"`` in its offer), within ``--max-lease-seconds``."""
    value = offer.get("lease_seconds")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= settings.max_lease_seconds:
        raise InvalidTensors(f"lease_seconds must be a number in (0, {settings.max_lease_seconds:g}], got {value!r}")
    return float(value)


async def _negotiate_encoding(state: ServingState, offer: dict[str, Any]) -> tuple[Encoding, str | None]:
    offered = encodings.offered_encodings(offer)
    wants_hidden = any(e.kind == protocol.ENCODING_HIDDEN for e in offered)
    refusal = await state.runner.run(encodings.hidden_refusal, state.target) if wants_hidden else None
    return encodings.choose_encoding(offered, refusal)


def _json_object(request: Request) -> dict[str, Any]:
    if not request.body:
        return {}
    try:
        body = request.json
    except Exception:  # noqa: BLE001 - Sanic raises its own BadRequest subclass here
        raise MalformedBody("body is not valid JSON") from None
    if not isinstance(body, dict):
        raise MalformedBody(f"expected a JSON object, got {type(body).__name__}")
    return body


@control.post(protocol.path(protocol.EP_SET_VOCAB_MAPPING))
async def set_vocab_mapping(request: Request) -> HTTPResponse:
    state = _state(request)
    session = _session(request)
    mapping = validate_vocab_mapping(decode_body(request.body), logits_size=state.target.logits_size)
    encodings.check_mapping(parse_encoding(session.encoding), mapping)

    def install() -> None:
        # On the model thread, so a forward in flight finishes with the mapping it started with.
        device = state.target.device
        session.mapping = VocabMapping(mapping.selected_token_ids.to(device), mapping.selected_token_mask.to(device))

    await state.runner.run(install)
    return json({"status": "ok"})


@control.post(protocol.path(protocol.EP_INIT_NCCL))
async def init_nccl(request: Request) -> HTTPResponse:
    # Upstream's NCCL group (CUDA only); "disabled" sends upstream clients to the wire body.
    plane, settings = request.app.ctx.data_planes, _state(request).settings
    return json(await upstream_nccl.init_nccl(plane, _session(request), _json_object(request), settings.port))


@control.post(protocol.path(protocol.EP_GENERATE))
async def generate(request: Request) -> None:
    state = _state(request)
    session = _session(request)
    settings = state.settings
    input_ids, attention_mask, loss_mask = validate_generate(
        decode_body(request.body),
        vocab_size=state.target.vocab_size,
        max_seq_len=settings.max_seq_len,
        max_batch_tokens=settings.max_batch_tokens,
    )
    mapping = session.mapping
    if mapping is None:
        raise NotConfigured("call /set_vocab_mapping before /generate: the draft vocabulary is not set")

    encoding = parse_encoding(session.encoding)
    transfer = dataplanes.plan_transfer(request, session)  # None: a plain wire answer
    probs = encoding.kind == protocol.ENCODING_PROBS

    def supervise() -> dict[str, torch.Tensor]:
        if probs:  # upstream's encoding: projected straight into reused memory, bit-identical
            return supervise_on_device(state.target, state.buffers, input_ids, attention_mask, loss_mask, mapping)
        return encodings.supervise(state.target, encoding, input_ids, attention_mask, loss_mask, mapping)

    # Only a negotiated (non-default) encoding is named: upstream's answer stays header-free.
    headers = None if probs else {protocol.ENCODING_HEADER: encoding.name}
    ops = operations(request)
    async with ops.admission.admit() as ticket:  # 503 + Retry-After when the queue is full
        if state.batcher is not None and probs and transfer is None:
            # Opt-in micro-batching: the batcher runs the stacked forward on the model thread
            # itself, so these requests are counted as queued until answered (no phase split).
            supervision = await state.batcher.supervise(input_ids, attention_mask, loss_mask, mapping)
        else:
            place = state.buffers.to_host if transfer is None else transfer.prepare  # a group may send from the device
            supervision = await ops.compute(state.runner.run, ticket, supervise, place, state.target.device)
        if transfer is None:
            await send_wire(request, supervision, ticket, headers)
            tier = protocol.TIER_WIRE
        else:
            tier = await transfer.answer(request, supervision, send_wire, ticket, headers)
        ops.generated(ticket, input_ids, data_plane=tier, encoding=session.encoding)


@control.post(protocol.path(protocol.EP_LM_HEAD_ROWS))
async def lm_head_rows(request: Request) -> None:
    """Extension: the LM head's rows for a draft vocabulary, for clients on the "hidden" encoding."""
    state = _state(request)
    _session(request)
    ids = encodings.validate_row_request(decode_body(request.body), logits_size=state.target.logits_size)

    def rows() -> dict[str, torch.Tensor]:
        refusal = encodings.hidden_refusal(state.target)
        if refusal is not None:
            raise encodings.EncodingError(f"'hidden' is not available for this model: {refusal}")
        return {"weight": encodings.lm_head_rows(state.target, ids)}

    await send_wire(request, await state.runner.run(rows))


@control.post(protocol.path(protocol.EP_HEARTBEAT))
async def heartbeat(request: Request) -> HTTPResponse:
    _session(request)  # renews the session's lease; 410 if it is gone
    return json({"status": "ok"})


@control.post(protocol.path(protocol.EP_DISCONNECT))
async def disconnect(request: Request) -> HTTPResponse:
    # Ends only the caller's session: unlike upstream's server, one client leaving does not
    # stop a server that others share. The anonymous session is never dropped.
    session_id = request.headers.get(protocol.SESSION_HEADER)
    if session_id:
        _state(request).sessions.drop(session_id)
    else:
        upstream_nccl.close(_session(request))  # an upstream client leaves: its NCCL group goes too
    return json({"status": "ok"})


def create_app(settings: Settings, target: Target, name: str = "eagle3_appliance") -> Sanic:
    """Build the application around an already-loaded target."""
    app = Sanic(name, configure_logging=False)
    app.config.REQUEST_MAX_SIZE = settings.max_body_bytes
    # A forward of a long batch on a big model can take minutes; the client has its own timeout.
    app.config.RESPONSE_TIMEOUT = 24 * 3600
    app.config.KEEP_ALIVE_TIMEOUT = 600
    app.config.NOISY_EXCEPTIONS = False
    app.ctx.state = ServingState(settings=settings, target=target)
    app.blueprint(control)
    dataplanes.install(app, settings, target.device)
    install_error_handler(app)
    ops = install_operations(app, settings, app.ctx.state.sessions)

    @app.after_server_stop
    async def _release(app: Sanic) -> None:
        app.ctx.state.runner.shutdown(wait=not ops.lifecycle.forced)

    return app


def run_server(app: Sanic, settings: Settings) -> int:
    """Serve until SIGINT/SIGTERM (or idle, with --exit-when-idle), in this process; the exit code.

    Sanic's single-process mode turns SIGTERM/SIGINT into a stop; the drain (appliance.lifecycle)
    runs before the listener closes.
    """
    app.config.GRACEFUL_SHUTDOWN_TIMEOUT = settings.grace_period
    app.prepare(host=settings.host, port=settings.port, single_process=True, access_log=False, motd=False)
    Sanic.serve_single(app)
    lifecycle = app.ctx.ops.lifecycle
    lifecycle.exit_now_if_forced()
    return lifecycle.exit_code()
