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
import os
import socket
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch

from client import protocol, wire
from client.buffers import BufferPool, pool_bytes_from_env
from client.contract import Eagle3TargetBackend, Eagle3TargetBatch
from client.control import ControlPlane
from client.dataplane import DataPlane, WireDataPlane
from client.errors import TargetHTTPError

__all__ = ["RemoteEagle3TargetModel", "RemoteResult"]

T = TypeVar("T")


class _Server:
    """One server: its control plane, session, data plane and the lock that serialises it.

    Connecting is lazy (on first use, like upstream) and tells the two kinds of server
    apart: ours answers ``POST /session`` with a session id that every later request
    carries; an upstream server answers 404 and is then spoken to in plain upstream
    protocol. If our server forgets the session (expired lease, restart: HTTP 410), the
    client registers again, replays its vocab mapping and retries the request once.
    """

    def __init__(self, control: ControlPlane, client_name: str) -> None:
        self.control = control
        self.client_name = client_name
        self.lock = threading.Lock()  # at most one request of ours in flight on this server
        self.session_id: str | None = None
        self.upstream = False
        self.data_plane: DataPlane | None = None
        self.mapping_payload: bytes | None = None
        self._connected = False

    def _connect(self) -> None:
        if self._connected:
            return
        try:
            reply = self.control.post_json(protocol.EP_SESSION, {"client": self.client_name})
        except TargetHTTPError as exc:
            if exc.status not in (404, 405):
                raise
            self.upstream, self.session_id = True, None
        else:
            self.upstream, self.session_id = False, str(reply["session_id"])
        self.control.set_header(protocol.SESSION_HEADER, self.session_id)
        self.data_plane = WireDataPlane(self.control)
        self._connected = True

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

    def _reconnect(self) -> None:
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
            if self._connected:
                try:  # best effort and quick: the server may already be gone
                    self.control.post_json(protocol.EP_DISCONNECT, {}, retries=False)
                except Exception:  # noqa: BLE001 - closing must not fail the trainer
                    pass
            if self.data_plane is not None:
                self.data_plane.close()
            self.control.close()


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

        target = RemoteEagle3TargetModel.from_urls(["http://node3:8001"], device="cuda")
        target.set_vocab_mapping(selected_token_ids, selected_token_mask)
        batch = target.generate_batch(input_ids, attention_mask, loss_mask)
        target.close()

    Memory: answers are received into a :class:`client.buffers.BufferPool` (at most
    ``buffer_pool_bytes``, default ``$EAGLE3_CLIENT_POOL_MB`` or 2 GiB). On a CUDA device
    those are pinned staging buffers, copied to the device before ``generate_batch``
    returns. On the CPU the batch's tensors *are* pool memory: it is reused only after
    every reference to the batch is gone, so keeping a batch is always safe.
    """

    def __init__(
        self,
        urls: Sequence[str],
        *,
        device: torch.device | str = "cpu",
        timeout: float = 120.0,
        max_retries: int = 3,
        backoff: float = 1.0,
        headers: dict[str, str] | None = None,
        buffer_pool_bytes: int | None = None,
    ) -> None:
        if isinstance(urls, str):
            urls = [u for u in urls.split(",") if u.strip()]
        if not urls:
            raise ValueError("RemoteEagle3TargetModel needs at least one server URL")
        self._device = torch.device(device)
        self._servers: list[_Server] = []
        self._pool = BufferPool(
            pool_bytes_from_env() if buffer_pool_bytes is None else buffer_pool_bytes,
            pin_memory=self._device.type == "cuda",
        )
        client_name = f"{socket.gethostname()}:{os.getpid()}"
        for url in urls:
            control = ControlPlane(
                url.strip(),
                timeout=timeout,
                max_retries=max_retries,
                backoff=backoff,
                headers=headers,
                buffer_pool=self._pool,
            )
            self._servers.append(_Server(control, client_name))
        self._next = itertools.cycle(range(len(self._servers)))
        self._next_lock = threading.Lock()
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._embeddings: torch.nn.Embedding | None = None

    @classmethod
    def from_urls(
        cls,
        urls: Sequence[str] | str,
        *,
        device: torch.device | str = "cpu",
        timeout: float = 120.0,
        max_retries: int = 3,
        **kwargs: Any,
    ) -> RemoteEagle3TargetModel:
        """Upstream's constructor signature; extra keyword options are ours."""
        return cls(urls, device=device, timeout=timeout, max_retries=max_retries, **kwargs)

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

    def model_info(self) -> dict[str, Any]:
        """The first server's ``/model_info`` (layers, hidden size, vocab, aux layer ids)."""
        return self._servers[0].call(lambda server: server.control.post_json(protocol.EP_MODEL_INFO))

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
        payload = wire.encode({"selected_token_ids": selected_token_ids, "selected_token_mask": selected_token_mask})
        for server in self._servers:
            server.set_vocab_mapping(payload)

    @torch.no_grad()
    def generate_batch(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor) -> Any:
        payload = _encode_inputs(input_ids, attention_mask, loss_mask)
        result = self._pick().generate(payload)
        return self._to_batch(result, attention_mask)

    def generate_batch_async(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor
    ) -> RemoteResult:
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=max(2, len(self._servers)), thread_name_prefix="eagle3-remote"
            )
        payload = _encode_inputs(input_ids, attention_mask, loss_mask)
        future = self._executor.submit(self._pick().generate, payload)
        return RemoteResult(future, lambda result: self._to_batch(result, attention_mask))

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

    def _to_batch(self, result: dict[str, torch.Tensor], attention_mask: torch.Tensor) -> Any:
        # The one copy to the trainer's device; blocking, so the pinned staging buffers are
        # free for the next answer as soon as this returns (a no-op on a CPU device).
        dev = self._device
        return Eagle3TargetBatch(
            aux_hidden_states=result["aux_hidden_states"].to(dev),
            input_ids=result["input_ids"].to(dev),
            attention_mask=attention_mask.to(dev),
            loss_mask=result["loss_mask"].to(dev),
            target_probs=result["target_probs"].to(dev),
            position_mask=result["position_mask"].to(dev).bool(),
        )


def _encode_inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor) -> bytes:
    return wire.encode({"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask})
