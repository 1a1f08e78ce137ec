"""``RemoteEagle3TargetModel``: the EAGLE-3 recipe's target backend, served by remote appliances.

Several requests per server (``max_in_flight_per_server``, default 2): a server runs one
forward at a time, but while one answer travels back the next forward can run, so a second
request in flight keeps the server busy. The data planes keep that correct (each wire answer
has its own HTTP exchange; group transfers are received in the order the server sends them,
see :mod:`eagle3_client.group_plane`). Several servers form a fleet (:mod:`eagle3_client.fleet`):
load-aware routing, failover, readiness probes, one model per fleet, an elastic server list.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import logging
import os
import socket
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from eagle3_client import protocol, wire
from eagle3_client.auth import auth_headers
from eagle3_client.buffers import BufferPool
from eagle3_client.contract import Eagle3TargetBackend, Eagle3TargetBatch
from eagle3_client.control import ControlPlane
from eagle3_client.dataplane import Answer, DataPlane, TransferStats, WireDataPlane
from eagle3_client.encodings import (
    PROBS,
    Encoding,
    EncodingStats,
    decode_supervision,
    detect_encoding,
    parse_encoding,
)
from eagle3_client.errors import ProtocolViolation, RemoteTargetError, TargetHTTPError, TargetUnreachable, first_line
from eagle3_client.fleet import Fleet, ServerList, is_server_failure
from eagle3_client.group_plane import GroupDataPlane
from eagle3_client.heartbeat import Heartbeat
from eagle3_client.negotiate import DataPlaneConfig, DataPlaneUnavailable, choose_tier, local_tiers, receive_device
from eagle3_client.options import ClientOptions

__all__ = ["RemoteEagle3TargetModel", "RemoteResult"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

_DISCONNECT_TIMEOUT_S = 2.0
_MAPPINGS_KEPT = 8  # vocab mappings whose answers can still be decoded (far more than can be in flight)
_ASYNC_WORKERS = 64  # threads for generate_batch_async (made on demand; a request holds one while in flight)


class _Server:
    """One server: its control plane, session and data plane.

    The fleet (:mod:`eagle3_client.fleet`) connects it (:meth:`join`), takes it out of the
    rotation when it fails (:meth:`leave`), probes it (:meth:`probe`) and takes it back with a
    new session (``join(rejoin=True)``). Connecting tells the two kinds of server apart: ours
    answers ``POST /session`` with a session id that every later request carries; an upstream
    server answers 404 and is then spoken to in plain upstream protocol. If our server forgets
    the session (expired lease, restart: HTTP 410), the client registers again, replays its
    vocab mapping and retries the request once.

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
    ) -> None:
        self.control = control
        self.lease_seconds = lease_seconds
        self.client_name = client_name
        self.config = config or DataPlaneConfig()
        self.device = device or torch.device("cpu")
        self.requested_encoding = encoding
        self.encoding = PROBS  # what the server agreed to send (upstream: always probs)
        self.session_id: str | None = None
        self.upstream = False
        self.fingerprint: str | None = None  # the served model's, from the session reply (ours only)
        self.data_plane: DataPlane | None = None
        self.mapping: tuple[bytes, int] | None = None  # the vocab mapping's wire payload and version
        self.heartbeat: Heartbeat | None = None
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
        )
        try:
            reply = self._session_reply(self.control.post_json(protocol.EP_SESSION, offer.to_json()))
        except TargetHTTPError as exc:
            if exc.status not in (404, 405):
                raise
            self.upstream, self.session_id, self.encoding, self.fingerprint = True, None, PROBS, None
            self.control.server_request_timeout = None
            offered = [protocol.TIER_WIRE]
            if wanted != PROBS:
                logger.warning(
                    "%s is an upstream server: it only sends 'probs', not the requested %r (same results, more bytes)",
                    self.control.url,
                    wanted.name,
                )
        else:
            self.upstream, self.session_id = False, reply.session_id
            self.fingerprint = reply.model_fingerprint
            self.control.server_request_timeout = reply.request_timeout
            self.encoding = _negotiated(self.control.url, reply, wanted)
            offered = list(reply.data_planes)
            if reply.lease_seconds is not None and reply.lease_seconds > 0:  # beat three times per lease
                self.heartbeat = Heartbeat(self.control, self.session_id, reply.lease_seconds / 3).start()
        self.control.set_header(protocol.SESSION_HEADER, self.session_id)
        try:
            tier = choose_tier(self.config.preference, local, offered, self.control.url)
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
        """What this server's data plane uses and has moved (see ``RemoteEagle3TargetModel.transport_stats``)."""
        plane, stats = self.data_plane, self.stats
        return {
            "url": self.control.url,
            "tier": plane.tier if plane is not None else protocol.TIER_WIRE,
            "negotiated": plane.group_tier if isinstance(plane, GroupDataPlane) else protocol.TIER_WIRE,
            "connected": self._connected,
            "upstream": self.upstream,
            "port": plane.port if isinstance(plane, GroupDataPlane) else None,
            "requests": stats.requests,
            "bytes": {tier: stats.bytes.get(tier, 0) for tier in protocol.TIERS},
            "transfer_seconds": {tier: stats.seconds.get(tier, 0.0) for tier in protocol.TIERS},
            "fallbacks": stats.fallbacks,
            "reupgrades": stats.reupgrades,
        }

    def call(self, fn: Callable[[_Server], T]) -> T:
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

    def generate(self, payload: bytes, *, retries: bool = True, failover: int = 0) -> Answer:
        """One ``/generate``; ``failover`` > 0 tells our server it is a re-sent request (attempt number)."""
        headers = {protocol.FAILOVER_HEADER: str(failover)} if failover and not self.upstream else None
        return self.call(lambda server: server.data_plane.fetch(payload, retries=retries, headers=headers))  # type: ignore[union-attr]

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


class RemoteResult:
    """Handle of an in-flight ``generate_batch_async``: ``result(timeout)`` and ``cancel()``."""

    def __init__(self, future: concurrent.futures.Future[Any], convert: Callable[[Any], Any]) -> None:
        self._future = future
        self._convert = convert

    def result(self, timeout: float | None = None) -> Any:
        return self._convert(self._future.result(timeout=timeout))

    def cancel(self) -> bool:
        """Cancel if it has not started; a request already on the wire runs to completion."""
        return self._future.cancel()

    def done(self) -> bool:
        return self._future.done()


class RemoteEagle3TargetModel(Eagle3TargetBackend):
    """EAGLE-3 target backend whose forward passes run on remote target appliances.

    Usage::

        target = RemoteEagle3TargetModel.from_urls(["http://node3:8001"], device="cuda", data_plane="auto")
        target.set_vocab_mapping(selected_token_ids, selected_token_mask)
        batch = target.generate_batch(input_ids, attention_mask, loss_mask)
        target.close()

    Options are keyword arguments, each with an environment variable that supplies its
    default (:class:`eagle3_client.options.ClientOptions`, and the docs' client option table):
    ``data_plane`` (``auto`` picks the best of nccl, gloo, wire that both ends support; a
    named tier is forced and raises ``DataPlaneUnavailable`` if the pair cannot do it),
    ``encoding``, ``token``, ``lease_seconds`` (asks our servers for this session lease; the
    client heartbeats three times per lease, and a server frees a session that went silent
    for longer, e.g. a killed trainer), timeouts and retries, and the fleet's options
    (``max_in_flight_per_server``, ``failover_timeout``, the probe intervals, ``server_list``).

    Several servers form a fleet (:mod:`eagle3_client.fleet`): a request goes to the server
    expected to finish it first, fails over to another when its server fails, and a failed
    server is probed and taken back once ready. Every server must serve the same model: the
    first call connects them all and raises :class:`~eagle3_client.errors.ModelMismatch` if
    their fingerprints differ.

    Memory: answers are received into a :class:`eagle3_client.buffers.BufferPool` (at most
    ``buffer_pool_mb``, default ``$EAGLE3_CLIENT_POOL_MB`` or 2 GiB). On a CUDA device
    those are pinned staging buffers, copied to the device before ``generate_batch``
    returns. On the CPU the batch's tensors *are* pool memory: it is reused only after
    every reference to the batch is gone, so keeping a batch is always safe.
    """

    def __init__(
        self,
        urls: Sequence[str] | str | os.PathLike[str] | None,
        *,
        device: torch.device | str = "cpu",
        headers: dict[str, str] | None = None,
        **options: Any,
    ) -> None:
        # Every option is checked here, before any I/O (ValueError/TypeError naming it).
        self.options = opts = ClientOptions.resolve(**options)
        url_list, server_list = _server_urls(urls, opts.server_list)
        self._device = torch.device(device)
        self._encoding = parse_encoding(opts.encoding) if opts.encoding else PROBS
        self._config = DataPlaneConfig(
            preference=opts.data_plane,
            timeout=opts.data_plane_timeout,
            connect_timeout=opts.data_plane_connect_timeout,
            backoff=opts.data_plane_backoff,
        )
        self._headers = {**auth_headers(opts.auth_token()), **(headers or {})}
        self._pool = BufferPool(opts.buffer_pool_bytes, pin_memory=self._device.type == "cuda")
        self._client_name = f"{socket.gethostname()}:{os.getpid()}"
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._executor_lock = threading.Lock()
        self._embeddings: torch.nn.Embedding | None = None
        # Vocab mappings by version (the newest last); "hidden" answers are decoded with the
        # LM-head rows of the mapping the server names on the answer, never a newer one.
        self._mappings: collections.OrderedDict[int, _Mapping] = collections.OrderedDict()
        self._mapping_version = 0
        self._rows_lock = threading.Lock()
        self._stats = EncodingStats()
        self._stats_lock = threading.Lock()
        # Last: building the fleet builds servers (_new_server), which read the state above.
        self._fleet: Fleet[_Server] = Fleet(
            [self._new_server(url) for url in url_list],
            make_server=self._new_server,
            max_in_flight=opts.max_in_flight_per_server,
            failover_timeout=opts.failover_timeout,
            probe_interval=opts.probe_interval,
            probe_max_interval=opts.probe_max_interval,
            server_list=server_list,
        )

    def _new_server(self, url: str) -> _Server:
        control = ControlPlane(
            url.strip(),
            timeout=self.options.timeout,
            generate_timeout=self.options.generate_timeout,
            max_retries=self.options.max_retries,
            backoff=self.options.backoff,
            headers=self._headers,
            buffer_pool=self._pool,
        )
        server = _Server(
            control,
            self._client_name,
            self._encoding,
            self._config,
            receive_device(self._device),
            self.options.lease_seconds,
        )
        if self._mappings:  # a server the list adds later gets the current mapping when it joins
            current = next(reversed(self._mappings.values()))
            server.mapping = (current.payload, current.version)
        return server

    @classmethod
    def from_urls(
        cls,
        urls: Sequence[str] | str | os.PathLike[str] | None,
        *,
        device: torch.device | str = "cpu",
        **options: Any,
    ) -> RemoteEagle3TargetModel:
        """Upstream's constructor (``timeout=120``, ``max_retries=3``); every other option is ours.

        ``urls`` is a list of server URLs, a comma-separated string, or the path of a file
        with one URL per line, which the client re-reads when it changes (as with
        ``server_list`` / ``$EAGLE3_SERVER_LIST``, used when ``urls`` is empty).

        ``encoding`` (default ``$EAGLE3_ENCODING``, else ``"probs"``) picks how supervision
        travels: ``probs``, ``logits``, ``hidden`` or the lossy ``topk:K``. The batches the
        recipe gets have the same fields, dtypes and devices whatever is chosen.
        """
        return cls(urls, device=device, **options)

    # -- the Eagle3TargetBackend contract ----------------------------------------------

    @property
    def num_remote_servers(self) -> int:
        """Servers in the list now (with a server-list file this follows the file)."""
        return self._fleet.size

    @property
    def supports_async(self) -> bool:
        return True

    @property
    def buffer_pool(self) -> BufferPool:
        """Where answers are received (its ``stats`` show how often memory was reused)."""
        return self._pool

    @property
    def _servers(self) -> list[_Server]:
        return [m.server for m in self._fleet.members]

    @property
    def urls(self) -> list[str]:
        return [m.url for m in self._fleet.members]

    def transport_stats(self) -> list[dict[str, Any]]:
        """One entry per server: ``url``, the ``tier`` in use now (``"nccl"``, ``"gloo"`` or
        ``"wire"``), the ``negotiated`` tier, ``bytes`` and ``transfer_seconds`` per tier,
        ``requests``, ``fallbacks`` (broken transfers answered over the wire) and
        ``reupgrades`` (returns to the group after a fallback); and its place in the fleet:
        ``state`` (``ready``, ``out``, ``joining``, ``draining``), ``reason`` and
        ``last_probe`` when out, ``in_flight`` (and its ``peak_in_flight``), ``served``, ``failovers`` (requests that
        failed there and went to another server), ``readmissions`` and
        ``seconds_per_request`` (the routing estimate)."""
        return [{**member.server.transport_stats(), **self._fleet.describe(member)} for member in self._fleet.members]

    def _any(self, fn: Callable[[_Server], T]) -> T:
        """``fn`` on any ready server (they serve the same model), failing over like a request."""
        return self._fleet.run(lambda server, _attempt: server.call(fn))

    def model_info(self) -> dict[str, Any]:
        """A server's ``/model_info``: upstream's keys (layers, hidden size, vocab, aux layer ids)."""
        info = dict(self._any(lambda server: server.control.post_json(protocol.EP_MODEL_INFO)))
        info.pop(protocol.MODEL_INFO_EXTENSION_KEY, None)
        return info

    def served_model(self) -> protocol.ModelInfoExtension | None:
        """What a server says about its model beyond upstream's keys (None: an upstream server)."""

        def read(server: _Server) -> protocol.ModelInfoExtension | None:
            extension = server.control.post_json(protocol.EP_MODEL_INFO).get(protocol.MODEL_INFO_EXTENSION_KEY)
            if extension is None:
                return None
            try:
                return protocol.ModelInfoExtension.from_json(extension)
            except ValueError as exc:
                raise ProtocolViolation(f"{server.url}/{protocol.EP_MODEL_INFO}: {exc}") from None

        return self._any(read)

    def get_input_embeddings(self) -> torch.nn.Embedding:
        """The target's input embedding (frozen), fetched once from a server and cached."""
        if self._embeddings is None:

            def fetch(server: _Server) -> torch.Tensor:
                weight = server.control.post_wire(protocol.EP_INPUT_EMBEDDINGS).get("weight")
                if weight is None:
                    raise ValueError(f"{server.url}/input_embeddings returned no weight")
                return weight

            weight = self._any(fetch)
            self._embeddings = torch.nn.Embedding.from_pretrained(weight.to(self._device), freeze=True)
        return self._embeddings

    def set_vocab_mapping(self, selected_token_ids: torch.Tensor, selected_token_mask: torch.Tensor) -> None:
        """Send the draft-vocabulary mapping to every server (each computes the projection).

        Each mapping gets a version that our servers name on every answer computed under it,
        so a batch in flight while the mapping changes is decoded entirely under the mapping
        it was computed with. A server out of the rotation gets it when it comes back.
        """
        draft_vocab = int(selected_token_ids.numel())
        if self._encoding.k is not None and self._encoding.k > draft_vocab:
            raise ValueError(f"encoding {self._encoding.name} needs K <= the draft vocabulary size {draft_vocab}")
        payload = wire.encode({"selected_token_ids": selected_token_ids, "selected_token_mask": selected_token_mask})
        self._fleet.start()
        with self._rows_lock:
            self._mapping_version += 1
            mapping = _Mapping(
                self._mapping_version, selected_token_ids.detach().to("cpu", torch.int64).contiguous(), payload
            )
            self._mappings[mapping.version] = mapping
            while len(self._mappings) > _MAPPINGS_KEPT:
                self._mappings.popitem(last=False)
        accepted, failed = 0, []
        for member in self._fleet.members:
            try:
                member.server.set_vocab_mapping(payload, mapping.version)
            except Exception as exc:
                if not is_server_failure(exc):
                    raise
                failed.append(exc)
                self._fleet.fail(member, exc)  # it gets the mapping when it is back
            else:
                accepted += not member.server._left
        if not accepted and failed:
            raise failed[-1]
        if any(s.encoding.kind == protocol.ENCODING_HIDDEN for s in self._servers if s._connected):
            self._rows_for(mapping)  # fetch the rows now rather than in the first batch

    def encoding_stats(self) -> dict[str, Any]:
        """The requested encoding, what each server agreed to, batches per encoding, topk's kept mass."""
        with self._stats_lock:
            stats = self._stats.as_dict()
        negotiated = {s.control.url: s.encoding.name if s._generation else None for s in self._servers}
        return {"requested": self._encoding.name, "negotiated": negotiated, **stats}

    @torch.no_grad()
    def generate_batch(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor) -> Any:
        return self._to_batch(self._generate(_encode_inputs(input_ids, attention_mask, loss_mask)), attention_mask)

    def generate_batch_async(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor
    ) -> RemoteResult:
        with self._executor_lock:
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(
                    max_workers=_ASYNC_WORKERS, thread_name_prefix="eagle3-remote"
                )
        payload = _encode_inputs(input_ids, attention_mask, loss_mask)
        future = self._executor.submit(self._generate, payload)
        return RemoteResult(future, lambda answer: self._to_batch(answer, attention_mask))

    def close(self) -> None:
        """Cancel queued work, tell every server goodbye, close connections."""
        self._fleet.begin_close()
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
        self._fleet.close()

    def __enter__(self) -> RemoteEagle3TargetModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- helpers ---------------------------------------------------------------------

    def _generate(self, payload: bytes) -> Answer:
        """One ``/generate`` on the fleet: the best ready server, another one if it fails."""
        single = self._fleet.size <= 1  # with peers, a failed server is not retried: the request fails over

        def attempt(server: _Server, number: int) -> Answer:
            return server.generate(payload, retries=single, failover=number if number > 1 else 0)

        return self._fleet.run(attempt, measure=True)

    def _mapping_for(self, version: int | None) -> _Mapping | None:
        """The mapping an answer was computed under (the newest when the server names none)."""
        with self._rows_lock:
            if version is None:
                return next(reversed(self._mappings.values())) if self._mappings else None
            mapping = self._mappings.get(version)
        if mapping is None:
            raise ProtocolViolation(f"an answer names vocab mapping {version}, which this client does not hold")
        return mapping

    def _rows_for(self, mapping: _Mapping | None) -> torch.Tensor:
        """``lm_head.weight[selected_token_ids]`` of ``mapping`` on our device, fetched once per mapping.

        All servers of one client serve the same model (the fleet checks it), so any of them
        gives the rows, and one copy serves answers from all of them.
        """
        if mapping is None:
            raise RuntimeError("call set_vocab_mapping before generate_batch")
        with self._rows_lock:
            if mapping.rows is None:
                ids = mapping.draft_ids
                payload = wire.encode({"selected_token_ids": ids})
                tensors = self._any(lambda s: s.control.post_wire(protocol.EP_LM_HEAD_ROWS, payload))
                weight = tensors.get("weight")
                if weight is None or weight.ndim != 2 or weight.shape[0] != ids.numel():
                    got = None if weight is None else list(weight.shape)
                    raise ProtocolViolation(
                        f"/{protocol.EP_LM_HEAD_ROWS} returned weight {got}, expected [{ids.numel()}, hidden_size]"
                    )
                mapping.rows = weight.to(self._device)
            return mapping.rows

    def _to_batch(self, answer: Answer, attention_mask: torch.Tensor) -> Any:
        # The one copy to the trainer's device (in decode_supervision); blocking, so the pinned
        # staging buffers are free for the next answer as soon as this returns.
        dev = self._device
        result = answer.tensors
        encoding = detect_encoding(result)  # what the server actually sent (checked against its header)
        mapping = self._mapping_for(answer.mapping_version)
        draft_vocab = None if mapping is None else int(mapping.draft_ids.numel())
        decoded = decode_supervision(
            result, encoding, device=dev, draft_vocab=draft_vocab, lm_head_rows=lambda: self._rows_for(mapping)
        )
        with self._stats_lock:
            self._stats.record(encoding, decoded)
        return Eagle3TargetBatch(
            aux_hidden_states=result["aux_hidden_states"].to(dev),
            input_ids=result["input_ids"].to(dev),
            attention_mask=attention_mask.to(dev),
            loss_mask=result["loss_mask"].to(dev),
            target_probs=decoded.target_probs,
            position_mask=decoded.position_mask,
        )


@dataclass(eq=False)
class _Mapping:
    """One vocab mapping as sent: its version, draft ids, wire payload and (for "hidden") LM-head rows."""

    version: int
    draft_ids: torch.Tensor
    payload: bytes
    rows: torch.Tensor | None = None


def _server_urls(
    urls: Sequence[str] | str | os.PathLike[str] | None, server_list: str | None
) -> tuple[list[str], ServerList | None]:
    """The initial URLs, and the server-list file to follow (a path given as ``urls``, else ``server_list``)."""
    if isinstance(urls, os.PathLike) or (isinstance(urls, str) and "://" not in urls and os.path.isfile(urls)):
        listed = ServerList(urls)
        return list(listed.urls), listed
    if isinstance(urls, str):
        urls = [u for u in urls.split(",") if u.strip()]
    given = [u.strip() for u in urls or [] if u.strip()]
    if given:
        return given, None
    if server_list:
        listed = ServerList(server_list)
        return list(listed.urls), listed
    raise ValueError("RemoteEagle3TargetModel needs at least one server URL (or a server list file)")


def _encode_inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor) -> bytes:
    return wire.encode({"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask})
