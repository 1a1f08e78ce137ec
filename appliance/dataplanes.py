"""Server side of the process-group data planes: one private NCCL or gloo group per session.

Why per session: every data-parallel rank of a trainer registers its own session, so each
gets its own group, rendezvous port and sender thread. Sends never run on the model thread
or the event loop, so one client's slow or broken transfer delays nobody else by more than
the forward they share.

Protocol (names in :mod:`client.protocol`):

* ``POST /session`` replies with ``"data_planes"``: the tiers this server offers.
* ``POST /data_plane`` ``{"tier": "gloo"|"nccl"}``: the server (rank 0) opens a rendezvous
  store on a port from ``--data-plane-ports`` (the kernel's choice when unset) and replies
  ``{"tier", "port", "key", "nonce", "timeout"}``; in the background it builds its end of the
  group (store keys under the secret ``key``, so only the session's owner can join) and sends
  a zero-tensor hello numbered ``nonce``, which the client checks. ``{"tier": "wire"}``
  tears the session's group down.
* ``/generate`` with ``X-Eagle3-Transfer: <seq>``: the answer is the transfer's metadata (JSON,
  header echoed) and the tensors follow on the group (framing in :mod:`client.transfer`).
  The result is kept as the session's last result. If the session has no working group the
  answer is a plain wire blob without the echo, which tells the client to fall back.
* ``POST /data_plane/resend`` ``{"seq": n}``: the stored result of transfer ``n`` as a wire
  blob, so a broken transfer costs no second forward.
* ``GET /data_plane``: every group's state and counters (JSON).

A failed or timed-out send tears the group down on this side; the peer's end then fails
too (gloo closes its sockets, NCCL is aborted), so a client that vanished mid-transfer
holds a sender thread for at most ``--data-plane-timeout`` seconds and never the server.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import secrets
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
import torch
from sanic import Blueprint, Request, Sanic
from sanic.response import HTTPResponse, json

from appliance.errors import ApplianceError, MalformedBody, NotConfigured, Unavailable
from appliance.sessions import Session
from appliance.settings import Settings
from client import protocol
from client.transfer import (
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
    "PortPool",
    "StoredResult",
    "Transfer",
    "blueprint",
    "install",
    "parse_port_range",
    "plan_transfer",
]

logger = logging.getLogger(__name__)

LINK_KEY = "data_plane"  # session.extras: the session's GroupLink
RESULT_KEY = "last_result"  # session.extras: the StoredResult of its last group transfer
_NONCE_LIMIT = 2**52  # hello numbers stay exact in any JSON reader
_KEEP_CLOSED = 32  # closed links listed by GET /data_plane, newest last

# appliance.server.send_wire(request, tensors, ticket, headers)
SendWire = Callable[[Request, Mapping[str, torch.Tensor], Any, Mapping[str, str] | None], Awaitable[None]]


class TierNotOffered(ApplianceError):
    status_code = 409


class InvalidRequest(ApplianceError):
    status_code = 422


class NoStoredResult(ApplianceError):
    status_code = protocol.RESEND_CONFLICT_STATUS


# -- ports -------------------------------------------------------------------------------


def parse_port_range(spec: str) -> tuple[int, int] | None:
    """``"29600-29699"`` -> ``(29600, 29699)``, ``"29600"`` -> one port, ``""``/``"0"`` -> None (kernel's choice)."""
    spec = spec.strip()
    if spec in ("", "0"):
        return None
    try:
        low, _, high = spec.partition("-")
        first, last = int(low), int(high or low)
    except ValueError:
        raise ValueError(f"expected a port or a range like 29600-29699, got {spec!r}") from None
    if not 1 <= first <= last <= 65535:
        raise ValueError(f"port range {spec!r} must satisfy 1 <= first <= last <= 65535")
    return first, last


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
    clients (:mod:`appliance.upstream_nccl`), which use this class too.
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

    def track(self, link: GroupLink) -> None:
        """Remember a link; closed ones are kept (the last few) for ``GET /data_plane``."""
        closed = [lk for lk in self.links if lk.closed][-_KEEP_CLOSED:]
        self.links = closed + [lk for lk in self.links if not lk.closed] + [link]


def _plane(request: Request) -> DataPlaneServer:
    return request.app.ctx.data_planes


def _session(request: Request) -> Session:
    return request.app.ctx.state.sessions.get(request.headers.get(protocol.SESSION_HEADER))


def _json_body(request: Request) -> dict[str, Any]:
    try:
        body = orjson.loads(request.body or b"{}")
    except orjson.JSONDecodeError:
        raise MalformedBody("body is not valid JSON") from None
    if not isinstance(body, dict):
        raise MalformedBody(f"expected a JSON object, got {type(body).__name__}")
    return body


def close_link(session: Session, state: str = "closed") -> None:
    link = session.extras.pop(LINK_KEY, None)
    if link is not None:
        link.close(state)


blueprint = Blueprint("data_planes")


@blueprint.post(protocol.path(protocol.EP_DATA_PLANE))
async def set_data_plane(request: Request) -> HTTPResponse:
    """Bring up (or, with ``"wire"``, tear down) the calling session's group."""
    session = _session(request)
    if session.anonymous:
        raise NotConfigured(
            "register with POST /session before asking for a data plane (upstream clients use /init_nccl)"
        )
    tier = _json_body(request).get("tier")
    if tier not in protocol.TIERS:
        raise InvalidRequest(f"tier must be one of {list(protocol.TIERS)}, got {tier!r}")
    close_link(session, "replaced" if tier != protocol.TIER_WIRE else "closed")
    if tier == protocol.TIER_WIRE:
        return json({"tier": protocol.TIER_WIRE})
    plane = _plane(request)
    if tier not in plane.offered:
        raise TierNotOffered(f"this server offers {plane.offered}, not {tier!r}")
    link, nonce, key = await plane.open_link(session, tier)
    session.extras[LINK_KEY] = link
    logger.info("data plane %s for %s: rendezvous on port %d", tier, session.client or session.id, link.port)
    return json({"tier": tier, "port": link.port, "key": key, "nonce": nonce, "timeout": link.timeout})


@blueprint.get(protocol.path(protocol.EP_DATA_PLANE))
async def data_plane_status(request: Request) -> HTTPResponse:
    """Offered tiers, ports, live groups and the last closed ones (plus the caller's own, if it names its session)."""
    plane = _plane(request)
    body: dict[str, Any] = {
        "offered": plane.offered,
        "ports": "-".join(map(str, plane.ports.range)) if plane.ports.range else "ephemeral",
        "timeout": plane.settings.data_plane_timeout,
        "links": [lk.describe() for lk in plane.links if not lk.closed],
        "recently_closed": [lk.describe() for lk in plane.links if lk.closed],
    }
    if request.headers.get(protocol.SESSION_HEADER):
        link = _session(request).extras.get(LINK_KEY)
        body["session"] = link.describe() if link is not None else {"tier": protocol.TIER_WIRE, "state": "none"}
    return json(body)


@blueprint.post(protocol.path(protocol.EP_DATA_PLANE_RESEND))
async def resend(request: Request) -> None:
    """The session's stored result of transfer ``seq`` as a wire blob; never a second forward."""
    from appliance.server import send_wire

    session = _session(request)
    try:
        seq = int(_json_body(request)["seq"])
    except (KeyError, TypeError, ValueError):
        raise MalformedBody('expected {"seq": <integer>}') from None
    stored = session.extras.get(RESULT_KEY)
    if stored is None or stored.seq != seq or not stored.tensors:
        held = None if stored is None else stored.seq
        raise NoStoredResult(f"no stored result for transfer {seq} (holding {held}); send /generate again")
    await send_wire(request, await asyncio.to_thread(host_copy, stored.tensors), None, stored.headers)


# -- /generate on a group ----------------------------------------------------------------


def host_copy(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: t.detach().to("cpu").contiguous() for key, t in tensors.items()}


def device_ready(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous, on their device, with the producing stream finished (the sender runs on another thread)."""
    out = {key: t.detach().contiguous() for key, t in tensors.items()}
    for t in out.values():
        if t.is_cuda:
            torch.cuda.current_stream(t.device).synchronize()
            break
    return out


class Transfer:
    """How one ``/generate`` answer leaves: ``prepare`` runs on the model thread, ``answer`` on the loop."""

    def __init__(self, session: Session, seq: int, link: GroupLink | None) -> None:
        self.session, self.seq, self.link = session, seq, link

    @property
    def on_device(self) -> bool:
        return self.link is not None and self.link.tier == protocol.TIER_NCCL

    def prepare(self, supervision: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return device_ready(supervision) if self.on_device else host_copy(supervision)

    async def answer(
        self,
        request: Request,
        supervision: dict[str, torch.Tensor],
        send_wire: SendWire,
        ticket: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> str:
        """Answer with metadata and send on the group, or with a wire body; returns the tier used."""
        link = self.link
        if link is None or not await link.wait_ready():
            # No working group: a plain wire blob, without the echo, tells the client to fall back.
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


def plan_transfer(request: Request, session: Session) -> Transfer | Any | None:
    """The transfer for this ``/generate``, or None for a plain wire answer (upstream behaviour).

    Our clients name a transfer with ``X-Eagle3-Transfer``; upstream's ask with ``X-NeMo-NCCL``.
    """
    header = request.headers.get(protocol.TRANSFER_HEADER)
    if header is not None and not session.anonymous:
        try:
            seq = int(header)
        except ValueError:
            raise MalformedBody(f"{protocol.TRANSFER_HEADER} must be an integer, got {header!r}") from None
        link = session.extras.get(LINK_KEY)
        return Transfer(session, seq, link if link is not None and not link.closed else None)
    if request.headers.get(protocol.NCCL_HEADER) == "1":
        from appliance.upstream_nccl import plan_upstream_transfer

        return plan_upstream_transfer(session)
    return None


def offered(app: Sanic) -> list[str]:
    return list(app.ctx.data_planes.offered)


def close_all(app: Sanic) -> None:
    for link in app.ctx.data_planes.links:
        link.close("shutdown")


def install(app: Sanic, settings: Settings, device: torch.device) -> None:
    """Add the data-plane endpoints and state to an app (called by ``create_app``)."""
    app.ctx.data_planes = DataPlaneServer.create(settings, device)
    app.blueprint(blueprint)

    @app.before_server_stop
    async def _close_links(app: Sanic) -> None:
        close_all(app)
