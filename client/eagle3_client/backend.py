"""``RemoteEagle3TargetModel``: the EAGLE-3 recipe's target backend, served by remote appliances.

Why at most one ``/generate`` per server per process: a server's aux-layer capture is a set
of forward hooks on one shared model, so it runs one forward at a time anyway; a second
request from the same process would only queue behind the first, and on a process-group
data plane two interleaved answers would pair the wrong sends and receives. Several servers
give parallelism: requests go round-robin, and ``generate_batch_async`` keeps up to one in
flight per server so the recipe's prefetch overlaps target inference with draft training.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import os
import socket
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch

from eagle3_client import protocol, wire
from eagle3_client.auth import auth_headers
from eagle3_client.buffers import BufferPool
from eagle3_client.contract import Eagle3TargetBackend, Eagle3TargetBatch
from eagle3_client.control import ControlPlane
from eagle3_client.dataplane import DataPlane, TransferStats, WireDataPlane
from eagle3_client.encodings import (
    PROBS,
    Encoding,
    EncodingStats,
    decode_supervision,
    detect_encoding,
    parse_encoding,
)
from eagle3_client.errors import ProtocolViolation, TargetHTTPError
from eagle3_client.group_plane import GroupDataPlane
from eagle3_client.heartbeat import Heartbeat
from eagle3_client.negotiate import DataPlaneConfig, DataPlaneUnavailable, choose_tier, local_tiers, receive_device
from eagle3_client.options import ClientOptions

__all__ = ["RemoteEagle3TargetModel", "RemoteResult"]

logger = logging.getLogger(__name__)

T = TypeVar("T")


class _Server:
    """One server: its control plane, session, data plane and the lock that serialises it.

    Connecting is lazy (on first use, like upstream) and tells the two kinds of server
    apart: ours answers ``POST /session`` with a session id that every later request
    carries; an upstream server answers 404 and is then spoken to in plain upstream
    protocol. If our server forgets the session (expired lease, restart: HTTP 410), the
    client registers again, replays its vocab mapping and retries the request once.
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
        self.lock = threading.Lock()  # at most one request of ours in flight on this server
        self.session_id: str | None = None
        self.upstream = False
        self.data_plane: DataPlane | None = None
        self.mapping_payload: bytes | None = None
        self.heartbeat: Heartbeat | None = None
        self.stats = TransferStats()  # survives re-registration
        self._connected = False

    def _connect(self) -> None:
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
        )
        try:
            reply = self._session_reply(self.control.post_json(protocol.EP_SESSION, offer.to_json()))
        except TargetHTTPError as exc:
            if exc.status not in (404, 405):
                raise
            self.upstream, self.session_id, self.encoding = True, None, PROBS
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
        """Run ``fn`` under the server lock, connected, re-registering once if the session is gone."""
        with self.lock:
            self._connect()
            try:
                return fn(self)
            except TargetHTTPError as exc:
                if exc.status != 410 or self.upstream:
                    raise
            self._reconnect()
            return fn(self)

    def _stop_heartbeat(self) -> None:
        if self.heartbeat is not None:
            self.heartbeat.stop()
            self.heartbeat = None

    def _reconnect(self) -> None:
        self._stop_heartbeat()
        if self.data_plane is not None:
            self.data_plane.close()
        self._connected = False
        self._connect()
        if self.mapping_payload is not None:
            self._send_mapping()

    def _send_mapping(self) -> None:
        assert self.mapping_payload is not None
        self.control.request(
            "POST", protocol.EP_SET_VOCAB_MAPPING, ControlPlane.read_json, content=self.mapping_payload
        )

    def set_vocab_mapping(self, payload: bytes) -> None:
        def send(server: _Server) -> None:
            server.mapping_payload = payload
            server._send_mapping()

        self.call(send)

    def generate(self, payload: bytes) -> dict[str, torch.Tensor]:
        return self.call(lambda server: server.data_plane.generate(payload))  # type: ignore[union-attr]

    def close(self) -> None:
        with self.lock:
            self._stop_heartbeat()
            if self._connected:
                try:  # best effort and quick: the server may already be gone
                    self.control.post_json(protocol.EP_DISCONNECT, {}, retries=False)
                except Exception:  # noqa: BLE001 - closing must not fail the trainer
                    pass
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
    for longer, e.g. a killed trainer), timeouts and retries.

    Memory: answers are received into a :class:`eagle3_client.buffers.BufferPool` (at most
    ``buffer_pool_mb``, default ``$EAGLE3_CLIENT_POOL_MB`` or 2 GiB). On a CUDA device
    those are pinned staging buffers, copied to the device before ``generate_batch``
    returns. On the CPU the batch's tensors *are* pool memory: it is reused only after
    every reference to the batch is gone, so keeping a batch is always safe.
    """

    def __init__(
        self,
        urls: Sequence[str] | str,
        *,
        device: torch.device | str = "cpu",
        headers: dict[str, str] | None = None,
        **options: Any,
    ) -> None:
        if isinstance(urls, str):
            urls = [u for u in urls.split(",") if u.strip()]
        if not urls:
            raise ValueError("RemoteEagle3TargetModel needs at least one server URL")
        # Every option is checked here, before any I/O (ValueError/TypeError naming it).
        self.options = opts = ClientOptions.resolve(**options)
        self._device = torch.device(device)
        self._encoding = parse_encoding(opts.encoding) if opts.encoding else PROBS
        config = DataPlaneConfig(
            preference=opts.data_plane,
            timeout=opts.data_plane_timeout,
            connect_timeout=opts.data_plane_connect_timeout,
            backoff=opts.data_plane_backoff,
        )
        headers = {**auth_headers(opts.auth_token()), **(headers or {})}
        self._servers: list[_Server] = []
        self._pool = BufferPool(opts.buffer_pool_bytes, pin_memory=self._device.type == "cuda")
        client_name = f"{socket.gethostname()}:{os.getpid()}"
        for url in urls:
            control = ControlPlane(
                url.strip(),
                timeout=opts.timeout,
                generate_timeout=opts.generate_timeout,
                max_retries=opts.max_retries,
                backoff=opts.backoff,
                headers=headers,
                buffer_pool=self._pool,
            )
            self._servers.append(
                _Server(control, client_name, self._encoding, config, receive_device(self._device), opts.lease_seconds)
            )
        self._next = itertools.cycle(range(len(self._servers)))
        self._next_lock = threading.Lock()
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._embeddings: torch.nn.Embedding | None = None
        # The draft vocabulary as last sent, and (for "hidden") its LM-head rows on our device.
        self._draft_ids: torch.Tensor | None = None
        self._lm_head_rows: torch.Tensor | None = None
        self._rows_lock = threading.Lock()
        self._stats = EncodingStats()
        self._stats_lock = threading.Lock()

    @classmethod
    def from_urls(
        cls, urls: Sequence[str] | str, *, device: torch.device | str = "cpu", **options: Any
    ) -> RemoteEagle3TargetModel:
        """Upstream's constructor (``timeout=120``, ``max_retries=3``); every other option is ours.

        ``encoding`` (default ``$EAGLE3_ENCODING``, else ``"probs"``) picks how supervision
        travels: ``probs``, ``logits``, ``hidden`` or the lossy ``topk:K``. The batches the
        recipe gets have the same fields, dtypes and devices whatever is chosen.
        """
        return cls(urls, device=device, **options)

    # -- the Eagle3TargetBackend contract ----------------------------------------------

    @property
    def num_remote_servers(self) -> int:
        return len(self._servers)

    @property
    def supports_async(self) -> bool:
        return True

    @property
    def buffer_pool(self) -> BufferPool:
        """Where answers are received (its ``stats`` show how often memory was reused)."""
        return self._pool

    @property
    def urls(self) -> list[str]:
        return [s.control.url for s in self._servers]

    def transport_stats(self) -> list[dict[str, Any]]:
        """One entry per server: ``url``, the ``tier`` in use now (``"nccl"``, ``"gloo"`` or
        ``"wire"``), the ``negotiated`` tier, ``bytes`` and ``transfer_seconds`` per tier,
        ``requests``, ``fallbacks`` (broken transfers answered over the wire) and
        ``reupgrades`` (returns to the group after a fallback)."""
        return [server.transport_stats() for server in self._servers]

    def model_info(self) -> dict[str, Any]:
        """The first server's ``/model_info``: upstream's keys (layers, hidden size, vocab, aux layer ids)."""
        info = dict(self._servers[0].call(lambda server: server.control.post_json(protocol.EP_MODEL_INFO)))
        info.pop(protocol.MODEL_INFO_EXTENSION_KEY, None)
        return info

    def served_model(self) -> protocol.ModelInfoExtension | None:
        """What the first server says about its model beyond upstream's keys (None: an upstream server)."""
        info = self._servers[0].call(lambda server: server.control.post_json(protocol.EP_MODEL_INFO))
        extension = info.get(protocol.MODEL_INFO_EXTENSION_KEY)
        if extension is None:
            return None
        try:
            return protocol.ModelInfoExtension.from_json(extension)
        except ValueError as exc:
            raise ProtocolViolation(f"{self._servers[0].control.url}/{protocol.EP_MODEL_INFO}: {exc}") from None

    def get_input_embeddings(self) -> torch.nn.Embedding:
        """The target's input embedding (frozen), fetched once from the first server and cached."""
        if self._embeddings is None:
            tensors = self._servers[0].call(lambda server: server.control.post_wire(protocol.EP_INPUT_EMBEDDINGS))
            weight = tensors.get("weight")
            if weight is None:
                raise ValueError(f"{self._servers[0].control.url}/input_embeddings returned no weight")
            self._embeddings = torch.nn.Embedding.from_pretrained(weight.to(self._device), freeze=True)
        return self._embeddings

    def set_vocab_mapping(self, selected_token_ids: torch.Tensor, selected_token_mask: torch.Tensor) -> None:
        """Send the draft-vocabulary mapping to every server (each computes the projection)."""
        draft_vocab = int(selected_token_ids.numel())
        if self._encoding.k is not None and self._encoding.k > draft_vocab:
            raise ValueError(f"encoding {self._encoding.name} needs K <= the draft vocabulary size {draft_vocab}")
        payload = wire.encode({"selected_token_ids": selected_token_ids, "selected_token_mask": selected_token_mask})
        with self._rows_lock:
            self._draft_ids = selected_token_ids.detach().to("cpu", torch.int64).contiguous()
            self._lm_head_rows = None  # rows of the old mapping are wrong now
        for server in self._servers:
            server.set_vocab_mapping(payload)
        for server in self._servers:  # fetch the rows now rather than in the first batch
            if server.encoding.kind == protocol.ENCODING_HIDDEN:
                self._rows_for(server)
                break

    def encoding_stats(self) -> dict[str, Any]:
        """The requested encoding, what each server agreed to, batches per encoding, topk's kept mass."""
        with self._stats_lock:
            stats = self._stats.as_dict()
        negotiated = {s.control.url: s.encoding.name if s._connected else None for s in self._servers}
        return {"requested": self._encoding.name, "negotiated": negotiated, **stats}

    @torch.no_grad()
    def generate_batch(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor) -> Any:
        payload = _encode_inputs(input_ids, attention_mask, loss_mask)
        server = self._pick()
        return self._to_batch(server.generate(payload), attention_mask, server)

    def generate_batch_async(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor
    ) -> RemoteResult:
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=max(2, len(self._servers)), thread_name_prefix="eagle3-remote"
            )
        payload = _encode_inputs(input_ids, attention_mask, loss_mask)
        server = self._pick()
        future = self._executor.submit(server.generate, payload)
        return RemoteResult(future, lambda result: self._to_batch(result, attention_mask, server))

    def close(self) -> None:
        """Cancel queued work, tell every server goodbye, close connections."""
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
        for server in self._servers:
            server.close()

    def __enter__(self) -> RemoteEagle3TargetModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- helpers ---------------------------------------------------------------------

    def _pick(self) -> _Server:
        with self._next_lock:
            return self._servers[next(self._next)]

    def _rows_for(self, server: _Server) -> torch.Tensor:
        """``lm_head.weight[selected_token_ids]`` on our device, fetched once per vocab mapping.

        All servers of one client serve the same model (the recipe needs identical
        supervision from each), so one copy serves answers from any of them.
        """
        with self._rows_lock:
            if self._lm_head_rows is None:
                if self._draft_ids is None:
                    raise RuntimeError("call set_vocab_mapping before generate_batch")
                payload = wire.encode({"selected_token_ids": self._draft_ids})
                tensors = server.call(lambda s: s.control.post_wire(protocol.EP_LM_HEAD_ROWS, payload))
                weight = tensors.get("weight")
                if weight is None or weight.ndim != 2 or weight.shape[0] != self._draft_ids.numel():
                    got = None if weight is None else list(weight.shape)
                    raise ProtocolViolation(
                        f"{server.control.url}/{protocol.EP_LM_HEAD_ROWS} returned weight {got}, "
                        f"expected [{self._draft_ids.numel()}, hidden_size]"
                    )
                self._lm_head_rows = weight.to(self._device)
            return self._lm_head_rows

    def _to_batch(self, result: dict[str, torch.Tensor], attention_mask: torch.Tensor, server: _Server) -> Any:
        # The one copy to the trainer's device (in decode_supervision); blocking, so the pinned
        # staging buffers are free for the next answer as soon as this returns.
        dev = self._device
        encoding = detect_encoding(result)  # what the server actually sent (checked against its header)
        draft_vocab = None if self._draft_ids is None else int(self._draft_ids.numel())
        decoded = decode_supervision(
            result, encoding, device=dev, draft_vocab=draft_vocab, lm_head_rows=lambda: self._rows_for(server)
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


def _encode_inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor) -> bytes:
    return wire.encode({"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask})
