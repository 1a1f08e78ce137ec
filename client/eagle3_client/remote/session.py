"""One server as the client sees it: its control plane, session, data plane and heartbeat.

Used by the fleet (:mod:`eagle3_client.remote.fleet`) through :class:`eagle3_client.remote.core.RemoteTarget`;
knows nothing of EAGLE-3 or DFlash beyond the vocab mapping it replays on every new session.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch

from eagle3_client import protocol
from eagle3_client.capture import EAGLE3, Capture
from eagle3_client.encodings import PROBS, Encoding, parse_encoding
from eagle3_client.errors import (
    CapabilityUnavailable,
    CaptureUnsupported,
    ModelMismatch,
    ProtocolViolation,
    RemoteTargetError,
    TargetHTTPError,
    TargetUnreachable,
    first_line,
)
from eagle3_client.remote.pin import ModelPin
from eagle3_client.transports.control import ControlPlane
from eagle3_client.transports.dataplane import Answer, DataPlane, TransferStats, WireDataPlane
from eagle3_client.transports.group_plane import GroupDataPlane
from eagle3_client.transports.heartbeat import Heartbeat
from eagle3_client.transports.negotiate import (
    DataPlaneConfig,
    DataPlaneUnavailable,
    choose_tier,
    local_tiers,
    same_gpu_reason,
    shared_gpu,
)

__all__ = ["ServerSession"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

_DISCONNECT_TIMEOUT_S = 2.0


class ServerSession:
    """One server: its control plane, session and data plane.

    The fleet (:mod:`eagle3_client.remote.fleet`) connects it (:meth:`join`), takes it out of the
    rotation when it fails (:meth:`leave`), probes it (:meth:`probe`) and takes it back with a
    new session (``join(rejoin=True)``). Connecting tells the two kinds of server apart: ours
    answers ``POST /session`` with a session id that every later request carries; an upstream
    server answers 404 and is then spoken to in plain upstream protocol. If our server forgets
    the session (expired lease, restart: HTTP 410), the client registers again, replays its
    vocab mapping and retries the request once. Every session it registers (the first, after a
    410, after a failover) must report the model the client pinned (:class:`ModelPin`): a server
    restarted on the same address with another checkpoint raises :class:`ModelMismatch`.

    Requests run concurrently (pipelining: the data planes are thread-safe); registering a
    session needs the server to itself, since every request carries the session's id. So
    requests hold a shared claim and (re-)registering an exclusive one, which waits for the
    requests in flight and holds new ones back until it is done.
    """

    def __init__(
        self,
        control: ControlPlane,
        client_name: str,
        encoding: Encoding = PROBS,
        config: DataPlaneConfig | None = None,
        device: torch.device | None = None,
        lease_seconds: float | None = None,
        capture: Capture = EAGLE3,
        pin: ModelPin | None = None,
    ) -> None:
        self.control = control
        # The client's model: every session this server registers is checked against it (_connect).
        self.pin = pin if pin is not None else ModelPin()
        self.capture = capture  # what the adapter's requests capture; negotiated with every session
        self.image_token_id: int | None = None  # a ViSpec or MSD session's, from its reply
        self.lease_seconds = lease_seconds
        self.client_name = client_name
        self.config = config or DataPlaneConfig()
        self.device = device or torch.device("cpu")
        self.requested_encoding = encoding
        self.encoding = PROBS  # what the server agreed to send (upstream: always probs)
        self.session_id: str | None = None
        self.upstream = False
        self.tier_reason: str | None = None  # why the negotiation passed over a faster tier (one GPU for both)
        self.fingerprint: str | None = None  # the served model's, from the session reply (ours only)
        self.capabilities: frozenset[str] = frozenset()  # request extensions the server granted (ours only)
        self.data_plane: DataPlane | None = None
        self.mapping: tuple[bytes, int] | None = None  # the vocab mapping's wire payload and version
        self.heartbeat: Heartbeat | None = None
        # Told when a heartbeat gets no answer (the fleet: Fleet.suspect); None: nobody listens.
        self.on_suspect: Callable[[str], None] | None = None
        self.stats = TransferStats()  # survives re-registration
        self._connected = False
        self._left = True  # out of the fleet's rotation (not joined yet): requests are refused until join()
        self._generation = 0  # sessions registered so far
        self._gate = threading.Condition()
        self._active = 0  # requests holding a shared claim
        self._exclusive = False
        self._exclusive_waiting = 0

    @property
    def url(self) -> str:
        return self.control.url

    # -- claims -------------------------------------------------------------------------

    def _enter(self) -> int:
        """A shared claim for one request; the session generation it runs under."""
        with self._gate:
            self._gate.wait_for(lambda: not self._exclusive and not self._exclusive_waiting)
            if self._left:
                raise TargetUnreachable(f"{self.url} is out of the rotation")
            self._active += 1
            return self._generation

    def _exit(self) -> None:
        with self._gate:
            self._active -= 1
            self._gate.notify_all()

    @contextlib.contextmanager
    def _alone(self, timeout: float | None = None) -> Iterator[None]:
        """The server to ourselves: waits until no request of ours is in flight (or ``timeout``)."""
        with self._gate:
            self._exclusive_waiting += 1
            try:
                free = self._gate.wait_for(lambda: not self._exclusive and self._active == 0, timeout)
            finally:
                self._exclusive_waiting -= 1
                self._gate.notify_all()
            if not free:
                raise TargetUnreachable(f"{self.url}: earlier requests are still in flight")
            self._exclusive = True
        try:
            yield
        finally:
            with self._gate:
                self._exclusive = False
                self._gate.notify_all()

    # -- sessions -----------------------------------------------------------------------

    def _connect(self, rejoin: bool = False) -> None:
        if self._connected:
            return
        self.control.set_header(protocol.SESSION_HEADER, None)  # a stale id must not ride along
        self.control.resume()  # a new session: whatever abort() abandoned belonged to the old one
        wanted = self.requested_encoding
        # We can always decode probs, so offering it as the fallback never costs a round-trip.
        local = local_tiers(self.device)
        offer = protocol.SessionOffer(
            client=self.client_name,
            encoding=wanted.name,
            encodings=tuple(dict.fromkeys([wanted.name, protocol.ENCODING_PROBS])),
            data_planes=tuple(local),
            lease_seconds=self.lease_seconds,
            rejoin=rejoin,
            capture=self.capture,
            capabilities=protocol.CAPABILITIES,  # asked for always: a request that needs one is checked
        )
        try:
            reply = self._session_reply(self.control.post_json(protocol.EP_SESSION, offer.to_json()))
        except TargetHTTPError as exc:
            if exc.status not in (404, 405):
                raise
            if not self.capture.is_eagle3:
                raise CaptureUnsupported(
                    f"{self.control.url} is an upstream EAGLE-3 server (no /{protocol.EP_SESSION}): it cannot "
                    f"serve {self.capture.named}, and would "
                    "answer with EAGLE-3 supervision; point this client at eagle3-appliance servers"
                ) from None
            self.upstream, self.session_id, self.encoding, self.fingerprint = True, None, PROBS, None
            server_gpus: tuple[str, ...] = ()
            self.capabilities = frozenset()
            self.control.server_request_timeout = None
            offered = [protocol.TIER_WIRE]
            if wanted != PROBS:
                logger.warning(
                    "%s is an upstream server: it only sends 'probs', not the requested %r (same results, more bytes)",
                    self.control.url,
                    wanted.name,
                )
        else:
            if reply.capture != self.capture:
                self._disconnect(reply.session_id)
                raise CaptureUnsupported(
                    f"{self.control.url} did not agree to {self.capture.named} "
                    f"(it answered {reply.capture.label}): an appliance from "
                    "before support for this capture; upgrade it"
                )
            if self.capture.is_vlm and reply.image_token_id is None:
                self._disconnect(reply.session_id)
                raise CaptureUnsupported(
                    f"{self.control.url} agreed to the {self.capture.label} capture without naming its model's "
                    "image token id: an appliance from before support for this capture; upgrade it"
                )
            self.image_token_id = reply.image_token_id
            try:  # every session, first or re-registered, of every path: never another model's answers
                self.pin.check(self.control.url, reply.model_fingerprint)
            except ModelMismatch:
                self._disconnect(reply.session_id)
                raise
            self.upstream, self.session_id = False, reply.session_id
            self.fingerprint = reply.model_fingerprint
            self.capabilities = frozenset(reply.capabilities)
            self.control.server_request_timeout = reply.request_timeout
            self.encoding = _negotiated(self.control.url, reply, wanted)
            offered = list(reply.data_planes)
            server_gpus = reply.gpu_uuids
            if reply.lease_seconds is not None and reply.lease_seconds > 0:  # beat three times per lease
                self.heartbeat = Heartbeat(
                    self.control, self.session_id, reply.lease_seconds / 3, on_failure=self._heartbeat_failed
                ).start()
        self.control.set_header(protocol.SESSION_HEADER, self.session_id)
        # Only a pair that could do NCCL asks which GPU it is on (an upstream server names none).
        both_nccl = protocol.TIER_NCCL in local and protocol.TIER_NCCL in offered
        same = shared_gpu(self.device, server_gpus) if both_nccl else None
        self.tier_reason = same_gpu_reason(same) if same is not None else None
        try:
            tier = choose_tier(self.config.preference, local, offered, self.control.url, same_gpu=same)
        except DataPlaneUnavailable:
            self._stop_heartbeat()
            if not self.upstream:  # leave nothing behind on the server
                self.control.post_json(protocol.EP_DISCONNECT, {}, retries=False)
            raise
        self.data_plane = self._make_data_plane(tier)
        self._generation += 1
        self._connected = True

    def _session_reply(self, body: Any) -> protocol.SessionReply:
        try:
            return protocol.SessionReply.from_json(body)
        except ValueError as exc:
            raise ProtocolViolation(f"{self.control.url}/{protocol.EP_SESSION}: {exc}") from None

    def _make_data_plane(self, tier: str) -> DataPlane:
        if tier == protocol.TIER_WIRE:
            return WireDataPlane(self.control, self.stats)
        return GroupDataPlane(self.control, tier=tier, config=self.config, device=self.device, stats=self.stats)

    def join(self, *, rejoin: bool, timeout: float | None = None) -> None:
        """Register a new session (ending an earlier one) and replay the vocab mapping.

        ``rejoin`` tells our server that this client takes it back after it was out (it counts
        re-admissions). ``timeout``: how long to wait for requests of the old session to finish.
        """
        with self._alone(timeout):
            self._drop_session(disconnect=True)
            self._left = False
            self._connect(rejoin=rejoin)
            if self.mapping is not None:
                self._send_mapping()

    def leave(self) -> None:
        """Out of the rotation: refuse new requests, stop the heartbeat, drop the data plane and
        end the session on the server (in the background: the server may be gone)."""
        with self._gate:
            self._left = True
        self._drop_session(disconnect=True, background=True)

    def _drop_session(self, *, disconnect: bool, background: bool = False) -> None:
        self._stop_heartbeat()
        if self.data_plane is not None:
            self.data_plane.close()
        was, self._connected = self._connected, False
        if was and disconnect and not self.upstream:  # an upstream server would shut itself down
            session = self.session_id
            if background:
                threading.Thread(target=self._disconnect, args=(session,), daemon=True).start()
            else:
                self._disconnect(session)

    def _disconnect(self, session: str | None) -> None:
        """Best effort and quick: end ``session`` on the server (which may be gone)."""
        if session is None:
            return
        try:
            self.control.request(
                "POST",
                protocol.EP_DISCONNECT,
                ControlPlane.read_json,
                content=b"{}",
                content_type=protocol.JSON,
                headers={protocol.SESSION_HEADER: session},
                retries=False,
                timeout=_DISCONNECT_TIMEOUT_S,
            )
        except Exception:  # noqa: BLE001 - the lease ends it anyway
            pass

    def probe(self, timeout: float) -> str | None:
        """None when the server answers ready (``/health/ready``; ``/health`` on an upstream server), else why not."""
        for endpoint in (protocol.EP_HEALTH_READY, protocol.EP_HEALTH):
            try:
                self.control.request("GET", endpoint, lambda resp: resp.read(), retries=False, timeout=timeout)
            except TargetHTTPError as exc:
                if exc.status == 404 and endpoint == protocol.EP_HEALTH_READY:
                    continue  # an upstream server: its /health is its readiness
                return f"{protocol.path(endpoint)} answered {exc.status}: {exc.server_message[:200]}"
            except RemoteTargetError as exc:
                return first_line(exc, limit=300)
            return None
        return "no health endpoint"  # pragma: no cover - /health answered 404 as well

    def transport_stats(self) -> dict[str, Any]:
        """What this server's data plane uses and has moved (see ``RemoteTarget.transport_stats``)."""
        plane, stats = self.data_plane, self.stats
        return {
            "url": self.control.url,
            "tier": plane.tier if plane is not None else protocol.TIER_WIRE,
            "negotiated": plane.group_tier if isinstance(plane, GroupDataPlane) else protocol.TIER_WIRE,
            "tier_reason": self.tier_reason,
            "connected": self._connected,
            "upstream": self.upstream,
            "port": plane.port if isinstance(plane, GroupDataPlane) else None,
            "requests": stats.requests,
            "bytes": {tier: stats.bytes.get(tier, 0) for tier in protocol.TIERS},
            "transfer_seconds": {tier: stats.seconds.get(tier, 0.0) for tier in protocol.TIERS},
            "fallbacks": stats.fallbacks,
            "reupgrades": stats.reupgrades,
        }

    def call(self, fn: Callable[[ServerSession], T]) -> T:
        """Run ``fn`` on the connected server, re-registering once if the session is gone (410)."""
        generation = self._enter()
        try:
            if not self._connected:  # a failed re-registration left it without a session
                raise TargetHTTPError(self.url, 410, "no session")
            return fn(self)
        except TargetHTTPError as exc:
            if exc.status != 410 or self.upstream:
                raise
        finally:
            self._exit()
        with self._alone():
            if self._left:
                raise TargetUnreachable(f"{self.url} is out of the rotation")
            if self._generation == generation or not self._connected:  # nobody registered since
                self._drop_session(disconnect=False)
                self._connect()
                if self.mapping is not None:
                    self._send_mapping()
        self._enter()
        try:
            return fn(self)
        finally:
            self._exit()

    def _heartbeat_failed(self, reason: str) -> None:
        if self.on_suspect is not None:
            self.on_suspect(reason)

    def abort(self, reason: str) -> None:
        """Abandon the requests in flight here now (they raise :class:`TargetUnreachable`); the
        server stopped answering. A new session (:meth:`join`) sends requests again."""
        self.control.abort(reason)

    def _stop_heartbeat(self) -> None:
        if self.heartbeat is not None:
            self.heartbeat.stop()
            self.heartbeat = None

    def _send_mapping(self) -> None:
        assert self.mapping is not None
        payload, version = self.mapping
        headers = None if self.upstream else {protocol.MAPPING_VERSION_HEADER: str(version)}
        self.control.request(
            "POST", protocol.EP_SET_VOCAB_MAPPING, ControlPlane.read_json, content=payload, headers=headers
        )

    def set_vocab_mapping(self, payload: bytes, version: int) -> None:
        """Remember the mapping (replayed on every new session) and send it, unless out of the rotation."""
        self.mapping = (payload, version)
        if not self._left:
            self.call(lambda server: server._send_mapping())

    def generate(
        self, payload: bytes, *, retries: bool = True, failover: int = 0, needs: frozenset[str] = frozenset()
    ) -> Answer:
        """One ``/generate``; ``failover`` > 0 tells our server it is a re-sent request (attempt number).

        ``needs``: the capabilities the request uses (``protocol.GenerateRequest.capabilities``);
        a server that did not grant one of them gets nothing (:class:`CapabilityUnavailable`).
        """

        def fetch(server: ServerSession) -> Answer:
            server.require(needs)
            return server.data_plane.fetch(payload, retries=retries, headers=headers)  # type: ignore[union-attr]

        headers = {protocol.FAILOVER_HEADER: str(failover)} if failover and not self.upstream else None
        return self.call(fetch)

    def claim(self, run_id: str, sample_id: str) -> Answer:
        """The answer this server keeps for a stream's sample (a ``/generate`` with ``X-Eagle3-Sample``,
        empty body), on this session's data plane; the request's tensors ride beside the supervision."""

        def fetch(server: ServerSession) -> Answer:
            server.require(frozenset({protocol.CAPABILITY_STREAM}))
            return server.data_plane.fetch(b"", retries=True, headers=headers)  # type: ignore[union-attr]

        headers = {protocol.SAMPLE_HEADER: f"{run_id}/{sample_id}"}
        return self.call(fetch)

    def produce(self, run_id: str, sample_id: str, payload: bytes, *, priority: bool = False) -> protocol.StreamRef:
        """Have this server compute a stream sample's answer and keep it (``/stream/produce``); its reference.

        Sent once (``retries=False``): the caller decides what a refusal means (a 503 with
        ``X-Eagle3-Stream-Full`` is a full server, not a failed one). A retry is safe: the server
        computes a sample it already keeps only once. ``priority``: the sample may use the room the
        server keeps for samples computed again (``X-Eagle3-Priority``).
        """

        def send(server: ServerSession) -> protocol.StreamRef:
            server.require(frozenset({protocol.CAPABILITY_STREAM}))
            body = server.control.request(
                "POST",
                protocol.EP_STREAM_PRODUCE,
                ControlPlane.read_json,
                content=payload,
                headers=headers,
                retries=False,
            )
            try:
                return protocol.StreamRef.from_json(body)
            except ValueError as exc:
                raise ProtocolViolation(f"{server.url}/{protocol.EP_STREAM_PRODUCE}: {exc}") from None

        headers = {protocol.SAMPLE_HEADER: f"{run_id}/{sample_id}"}
        if priority:
            headers[protocol.PRIORITY_HEADER] = "1"
        return self.call(send)

    def require(self, needs: frozenset[str]) -> None:
        """Raise :class:`CapabilityUnavailable` unless this session was granted every capability in ``needs``."""
        for capability in sorted(needs - self.capabilities):
            if self.upstream:
                reason = (
                    "it is an upstream server (it answered POST /session with 404), which has no request extensions"
                )
            else:
                reason = "its POST /session reply does not grant it (an older eagle3-appliance, or a model that cannot)"
            if capability == protocol.CAPABILITY_PACKING:
                reason += "; it would run each packed row as one sequence, attending across documents"
            raise CapabilityUnavailable(self.url, capability, reason)

    def close(self) -> None:
        with self._gate:
            self._left = True
        self._stop_heartbeat()
        if self._connected and not self.upstream:
            self._disconnect(self.session_id)
        elif self._connected:  # upstream's server expects its client to say goodbye (it then exits)
            try:
                self.control.post_json(protocol.EP_DISCONNECT, {}, retries=False)
            except Exception:  # noqa: BLE001 - closing must not fail the trainer
                pass
        self._connected = False
        if self.data_plane is not None:
            self.data_plane.close()
        self.control.close()


def _negotiated(url: str, reply: protocol.SessionReply, wanted: Encoding) -> Encoding:
    """The encoding in a /session reply; a warning when it is not the one we asked for."""
    try:
        got = parse_encoding(reply.encoding)
    except ValueError as exc:
        raise ProtocolViolation(f"{url}/{protocol.EP_SESSION}: {exc}") from None
    if got != wanted:
        reason = reply.encoding_refused or "no reason given"
        logger.warning("%s uses encoding %r instead of the requested %r: %s", url, got.name, wanted.name, reason)
    return got
