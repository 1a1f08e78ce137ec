"""The generic remote target: options, a fleet of server sessions, requests sync and async.

:class:`RemoteTarget` knows how to reach servers, route a ``/generate`` payload to the best
one (failing over when it fails), fetch the target's frozen tensors once, and run requests in
the background; ``generate_batch`` and ``generate_batch_async`` (upstream's signatures, packed
rows included) are defined here once. What a request captures is the adapter's choice: the
EAGLE-3 backend (:class:`eagle3_client.backend.RemoteEagle3TargetModel`) and the DFlash family's
(:class:`eagle3_client.dflash.RemoteDFlashTargetModel`) are thin adapters that name their
capture and turn an :class:`~eagle3_client.transports.dataplane.Answer` into the recipe's batch
type (``_to_batch``).
"""

from __future__ import annotations

import concurrent.futures
import os
import socket
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import torch

from eagle3_client import protocol
from eagle3_client.auth import auth_headers
from eagle3_client.capture import EAGLE3, Capture
from eagle3_client.encodings import PROBS, parse_encoding
from eagle3_client.errors import ProtocolViolation
from eagle3_client.options import ClientOptions
from eagle3_client.remote.fleet import Fleet, ServerList
from eagle3_client.remote.pin import ModelPin
from eagle3_client.remote.request import Packing, encode_request
from eagle3_client.remote.session import ServerSession
from eagle3_client.transports.buffers import BufferPool
from eagle3_client.transports.control import ControlPlane
from eagle3_client.transports.dataplane import Answer
from eagle3_client.transports.negotiate import DataPlaneConfig, receive_device

__all__ = ["RemoteResult", "RemoteTarget"]

T = TypeVar("T")
_Target = TypeVar("_Target", bound="RemoteTarget")

_ASYNC_WORKERS = 64  # threads for the async calls (made on demand; a request holds one while in flight)


class RemoteResult:
    """Handle of an in-flight async request: ``result(timeout)`` and ``cancel()``."""

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


class RemoteTarget:
    """A frozen target served by one or more remote servers (see the adapters for the recipes' surfaces).

    Options are keyword arguments, each with an environment variable that supplies its
    default (:class:`eagle3_client.options.ClientOptions`, and the docs' client option table).
    Every option is checked before any I/O (``ValueError``/``TypeError`` naming it).
    """

    def __init__(
        self,
        urls: Sequence[str] | str | os.PathLike[str] | None,
        *,
        device: torch.device | str = "cpu",
        headers: dict[str, str] | None = None,
        capture: Capture = EAGLE3,
        **options: Any,
    ) -> None:
        self.options = opts = ClientOptions.resolve(**options)
        self._capture = capture  # negotiated with every server's session (eagle3_client.capture)
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
        self._pin = ModelPin()  # the model every session of every server must report (eagle3_client.remote.pin)
        # Last: building the fleet builds servers (_new_server), which read the state above
        # (and the adapter's, which it sets before calling this).
        self._fleet: Fleet[ServerSession] = Fleet(
            [self._new_server(url) for url in url_list],
            make_server=self._new_server,
            max_in_flight=opts.max_in_flight_per_server,
            failover_timeout=opts.failover_timeout,
            probe_interval=opts.probe_interval,
            probe_max_interval=opts.probe_max_interval,
            server_list=server_list,
        )

    def _new_server(self, url: str) -> ServerSession:
        control = ControlPlane(
            url.strip(),
            timeout=self.options.timeout,
            generate_timeout=self.options.generate_timeout,
            max_retries=self.options.max_retries,
            backoff=self.options.backoff,
            headers=self._headers,
            buffer_pool=self._pool,
        )
        server = ServerSession(
            control,
            self._client_name,
            self._encoding,
            self._config,
            receive_device(self._device),
            self.options.lease_seconds,
            self._capture,
            self._pin,
        )
        server.on_suspect = lambda reason: self._fleet.suspect(server, reason)  # a failed heartbeat
        self._prepare_server(server)
        return server

    def _prepare_server(self, server: ServerSession) -> None:
        """Hook: state a server needs before it joins (the EAGLE-3 adapter hands it the vocab mapping)."""

    # -- the fleet ------------------------------------------------------------------------

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
    def _servers(self) -> list[ServerSession]:
        return [m.server for m in self._fleet.members]

    @property
    def urls(self) -> list[str]:
        return [m.url for m in self._fleet.members]

    def transport_stats(self) -> list[dict[str, Any]]:
        """One entry per server: ``url``, the ``tier`` in use now (``"nccl"``, ``"gloo"`` or
        ``"wire"``), the ``negotiated`` tier and ``tier_reason`` (why ``auto`` passed over a faster
        tier, or None: trainer and server on one GPU), ``bytes`` and ``transfer_seconds`` per tier,
        ``requests``, ``fallbacks`` (broken transfers answered over the wire) and
        ``reupgrades`` (returns to the group after a fallback); and its place in the fleet:
        ``state`` (``ready``, ``out``, ``joining``, ``draining``), ``reason`` and
        ``last_probe`` when out, ``in_flight`` (and its ``peak_in_flight``), ``served``, ``failovers`` (requests that
        failed there and went to another server), ``readmissions`` and
        ``seconds_per_request`` (the routing estimate)."""
        return [{**member.server.transport_stats(), **self._fleet.describe(member)} for member in self._fleet.members]

    def _any(self, fn: Callable[[ServerSession], T]) -> T:
        """``fn`` on any ready server (they serve the same model), failing over like a request."""
        return self._fleet.run(lambda server, _attempt: server.call(fn))

    # -- what every target serves ---------------------------------------------------------

    def model_info(self) -> dict[str, Any]:
        """A server's ``/model_info``: upstream's keys (layers, hidden size, vocab, aux layer ids)."""
        info = dict(self._any(lambda server: server.control.post_json(protocol.EP_MODEL_INFO)))
        info.pop(protocol.MODEL_INFO_EXTENSION_KEY, None)
        return info

    def served_model(self) -> protocol.ModelInfoExtension | None:
        """What a server says about its model beyond upstream's keys (None: an upstream server)."""

        def read(server: ServerSession) -> protocol.ModelInfoExtension | None:
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

            def fetch(server: ServerSession) -> torch.Tensor:
                weight = server.control.post_wire(protocol.EP_INPUT_EMBEDDINGS).get("weight")
                if weight is None:
                    raise ValueError(f"{server.url}/input_embeddings returned no weight")
                return weight

            weight = self._any(fetch)
            self._embeddings = torch.nn.Embedding.from_pretrained(weight.to(self._device), freeze=True)
        return self._embeddings

    # -- requests: what the recipe calls; the adapter turns each answer into its batch ----

    @torch.no_grad()
    def generate_batch(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        loss_mask: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        seq_lens: torch.Tensor | None = None,
        doc_remaining: torch.Tensor | None = None,
    ) -> Any:
        """The target's answer for one batch, as the adapter's co-located wrapper returns it.

        Upstream's signature. Packed rows (the recipe's ``packed_sequence_size``): pass all three
        of ``position_ids`` ``[B,T]``, ``seq_lens`` ``[B,max_docs]`` and ``doc_remaining``
        ``[B,T]``. The server then runs its forward with the documents of a row kept apart, and
        the batch carries the three unchanged, as the co-located wrapper's does. A server that
        did not grant packing (upstream's, an older appliance) gets nothing:
        :class:`~eagle3_client.errors.CapabilityUnavailable`.
        """
        return self._request_batch(input_ids, attention_mask, loss_mask, position_ids, seq_lens, doc_remaining)

    def generate_batch_async(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        loss_mask: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        seq_lens: torch.Tensor | None = None,
        doc_remaining: torch.Tensor | None = None,
    ) -> RemoteResult:
        """:meth:`generate_batch` in the background: a handle with ``result(timeout)`` and ``cancel()``."""
        result: RemoteResult = self._request_batch(
            input_ids, attention_mask, loss_mask, position_ids, seq_lens, doc_remaining, background=True
        )
        return result

    def _request_batch(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        loss_mask: torch.Tensor,
        position_ids: torch.Tensor | None,
        seq_lens: torch.Tensor | None,
        doc_remaining: torch.Tensor | None,
        *,
        vision: Mapping[str, torch.Tensor] | None = None,
        background: bool = False,
    ) -> Any:
        """One request's batch (``background``: a :class:`RemoteResult` for it); ``vision``: the
        request's vision tensors, for a capture that takes them."""
        request, payload, packing = encode_request(
            input_ids,
            attention_mask,
            loss_mask,
            position_ids,
            seq_lens,
            doc_remaining,
            capture=self._capture,
            vision=vision,
        )
        if background:
            return self._submit(
                payload,
                lambda answer: self._to_batch(answer, input_ids, attention_mask, loss_mask, packing),
                request.capabilities,
            )
        answer = self._generate(payload, request.capabilities)
        return self._to_batch(answer, input_ids, attention_mask, loss_mask, packing)

    def claim(self, run_id: str, sample_id: str) -> Answer:
        """A stream sample's answer kept by this target's server (the consumer's store has one target per
        appliance: the answer lives on the one that computed it, so there is no failover)."""
        return self._fleet.run(lambda server, _attempt: server.claim(run_id, sample_id))

    def _to_batch(
        self,
        answer: Answer,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        loss_mask: torch.Tensor,
        packing: Packing | None,
    ) -> Any:
        """The adapter's batch type from one answer and the request's tensors."""
        raise NotImplementedError

    def _generate(self, payload: bytes, needs: frozenset[str] = frozenset()) -> Answer:
        """One ``/generate`` on the fleet: the best ready server, another one if it fails.

        ``needs``: the capabilities the payload uses; a server without one of them raises
        :class:`~eagle3_client.errors.CapabilityUnavailable` (not a server failure: no failover).
        """
        # With peers a failed server is not retried: the request fails over (a timed-out answer is
        # retried all the same: eagle3_client.transports.control).
        single = self._fleet.size <= 1

        def attempt(server: ServerSession, number: int) -> Answer:
            return server.generate(payload, retries=single, failover=number if number > 1 else 0, needs=needs)

        return self._fleet.run(attempt, measure=True)

    def _submit(
        self, payload: bytes, convert: Callable[[Answer], Any], needs: frozenset[str] = frozenset()
    ) -> RemoteResult:
        """``_generate(payload, needs)`` in the background; ``convert`` turns its answer into the caller's batch."""
        with self._executor_lock:
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(
                    max_workers=_ASYNC_WORKERS, thread_name_prefix="eagle3-remote"
                )
            future = self._executor.submit(self._generate, payload, needs)
        return RemoteResult(future, convert)

    def close(self) -> None:
        """Cancel queued work, tell every server goodbye, close connections."""
        self._fleet.begin_close()
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
        self._fleet.close()

    def __enter__(self: _Target) -> _Target:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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
    raise ValueError("a remote target needs at least one server URL (or a server list file)")
