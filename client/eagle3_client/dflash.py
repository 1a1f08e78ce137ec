"""``RemoteDFlashTargetModel``: the DFlash family's target (DFlash, DFlash 2, JetSpec, Domino), served remotely.

A thin adapter over :class:`eagle3_client.remote.core.RemoteTarget`, like the EAGLE-3 one: the
same servers, options, fleet, data planes and async requests. What differs is the capture
(:class:`eagle3_client.capture.Capture`): the recipe's ``target_layer_ids``, unshifted, and the
full-vocabulary logits when ``capture_logits`` (JetSpec). Every server negotiates it in its
``/session``; an upstream server (or an appliance without DFlash support) is refused with
:class:`~eagle3_client.errors.CaptureUnsupported`, never asked for a batch it would answer
with EAGLE-3 supervision.

The surface is the one NeMo AutoModel's DFlash recipes use of ``HFDFlashTargetModel``:
``generate_batch`` returning upstream's ``DFlashTargetBatch`` (when AutoModel is installed;
an equivalent local dataclass otherwise), ``target_layer_ids``, ``get_input_embeddings()``
and ``get_output_embeddings()`` (the LM head, fetched once in chunks of at most
:data:`LM_HEAD_CHUNK_BYTES`, from one server whose model fingerprint is checked before and
after).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, TypeVar

import torch

from eagle3_client import protocol, wire
from eagle3_client.capture import KEY_HIDDEN_STATES, KEY_LOGITS, Capture, dflash_batch_type
from eagle3_client.errors import CaptureUnsupported, ModelMismatch, ProtocolViolation
from eagle3_client.remote.core import RemoteTarget
from eagle3_client.remote.request import Packing
from eagle3_client.remote.session import ServerSession
from eagle3_client.transports.dataplane import Answer

__all__ = ["LM_HEAD_CHUNK_BYTES", "FixedCaptureTarget", "LMHeadTarget", "RemoteDFlashTargetModel", "dflash_batch_type"]

# The LM head travels in requests of at most this many bytes (a 152k x 8192 bf16 head is 2.5 GB).
LM_HEAD_CHUNK_BYTES = 64 << 20

_Target = TypeVar("_Target", bound="FixedCaptureTarget")


class LMHeadTarget(RemoteTarget):
    """A remote target whose draft reuses the LM head (DFlash, DSpark, ViSpec, MSD, EAGLE-1/2)."""

    _lm_head: torch.nn.Linear | None = None

    def lm_head_linear(self) -> torch.nn.Linear:
        """The target's LM head (frozen, no bias), fetched once in bounded chunks and cached."""
        if self._lm_head is None:
            self._lm_head = lm_head_module(self)
        return self._lm_head


class FixedCaptureTarget(LMHeadTarget):
    """An adapter whose capture takes no arguments: the class's ``CAPTURE`` (ViSpec, MSD, EAGLE-1/2)."""

    CAPTURE: Capture

    def __init__(
        self,
        urls: Sequence[str] | str | os.PathLike[str] | None,
        *,
        device: torch.device | str = "cpu",
        headers: dict[str, str] | None = None,
        **options: Any,
    ) -> None:
        super().__init__(urls, device=device, headers=headers, capture=self.CAPTURE, **options)

    @classmethod
    def from_urls(
        cls: type[_Target],
        urls: Sequence[str] | str | os.PathLike[str] | None,
        *,
        device: torch.device | str = "cpu",
        **options: Any,
    ) -> _Target:
        """Like ``RemoteEagle3TargetModel.from_urls``."""
        return cls(urls, device=device, **options)

    def get_lm_head(self) -> torch.nn.Linear:
        """The target's LM head (frozen, no bias), fetched once in bounded chunks and cached."""
        return self.lm_head_linear()


class RemoteDFlashTargetModel(LMHeadTarget):
    """DFlash-family target whose forwards run on remote appliances.

    Usage::

        target = RemoteDFlashTargetModel.from_urls(["http://node3:8001"], target_layer_ids=[1, 9, 17, 25, 33])
        batch = target.generate_batch(input_ids, attention_mask, loss_mask)   # DFlashTargetBatch
        lm_head, embed = target.get_output_embeddings(), target.get_input_embeddings()
        target.close()

    Options: exactly those of :class:`eagle3_client.backend.RemoteEagle3TargetModel` (data
    plane, auth token, leases, timeouts, fleet); ``encoding`` does not apply (the answer is the
    layers' outputs and, with ``capture_logits``, the logits, sent as computed).
    """

    def __init__(
        self,
        urls: Sequence[str] | str | os.PathLike[str] | None,
        *,
        target_layer_ids: Sequence[int],
        capture_logits: bool = False,
        device: torch.device | str = "cpu",
        headers: dict[str, str] | None = None,
        **options: Any,
    ) -> None:
        layers = [int(i) for i in target_layer_ids]
        if not layers:
            raise ValueError("DFlash requires at least one target_layer_id.")
        self.target_layer_ids = layers
        self.capture_logits = bool(capture_logits)
        capture = Capture.dflash(layers, logits=self.capture_logits)
        super().__init__(urls, device=device, headers=headers, capture=capture, **options)

    @classmethod
    def from_urls(
        cls,
        urls: Sequence[str] | str | os.PathLike[str] | None,
        *,
        target_layer_ids: Sequence[int],
        capture_logits: bool = False,
        device: torch.device | str = "cpu",
        **options: Any,
    ) -> RemoteDFlashTargetModel:
        """Like ``RemoteEagle3TargetModel.from_urls``, with the layers (and logits) to capture."""
        return cls(urls, target_layer_ids=target_layer_ids, capture_logits=capture_logits, device=device, **options)

    # -- what the recipe calls ----------------------------------------------------------

    def get_output_embeddings(self) -> torch.nn.Linear:
        """The target's LM head (frozen, no bias), fetched once in bounded chunks and cached."""
        return self.lm_head_linear()

    # -- decoding ----------------------------------------------------------------------

    def _to_batch(
        self,
        answer: Answer,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        loss_mask: torch.Tensor,
        packing: Packing | None,
    ) -> Any:
        dev = self._device
        tensors = answer.tensors
        hidden = tensors.get(KEY_HIDDEN_STATES)
        logits = tensors.get(KEY_LOGITS)
        if hidden is None or hidden.shape[:2] != input_ids.shape or (logits is None) == self.capture_logits:
            raise ProtocolViolation(
                f"a DFlash answer has keys {sorted(tensors)} and hidden_states "
                f"{None if hidden is None else list(hidden.shape)} for a batch of {list(input_ids.shape)}"
            )
        if logits is not None and logits.shape[:2] != input_ids.shape:
            raise ProtocolViolation(f"a DFlash answer's logits are {list(logits.shape)} for {list(input_ids.shape)}")

        def here(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(dev)

        return dflash_batch_type()(
            hidden_states=hidden.to(dev),
            input_ids=input_ids.to(dev),
            attention_mask=attention_mask.to(dev),
            loss_mask=loss_mask.to(dev),
            logits=here(logits),
            **({} if packing is None else packing.on(dev)),
        )


def lm_head_module(target: RemoteTarget) -> torch.nn.Linear:
    """The target's LM head as a frozen bias-free ``Linear`` on the target's device, fetched from one server
    (the DFlash family's and DSpark's drafts reuse it)."""
    weight = target._any(fetch_lm_head)
    head = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    head.weight = torch.nn.Parameter(weight.to(target._device), requires_grad=False)
    return head


def fetch_lm_head(server: ServerSession) -> torch.Tensor:
    """The whole LM head weight ``[V,H]`` from one server, in chunks, under one model fingerprint."""
    before = _served(server)
    hidden = int(server.control.post_json(protocol.EP_MODEL_INFO)["hidden_size"])
    dtype = getattr(torch, before.dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise ProtocolViolation(f"{server.url}/{protocol.EP_MODEL_INFO} names an unknown dtype {before.dtype!r}")
    rows = max(1, LM_HEAD_CHUNK_BYTES // (hidden * dtype.itemsize))
    weight = torch.empty(before.logits_size, hidden, dtype=dtype)
    for start in range(0, before.logits_size, rows):
        stop = min(before.logits_size, start + rows)
        ids = torch.arange(start, stop, dtype=torch.int64)
        chunk = server.control.post_wire(protocol.EP_LM_HEAD_ROWS, wire.encode({"selected_token_ids": ids}))
        part = chunk.get("weight")
        if part is None or part.shape != (stop - start, hidden) or part.dtype != dtype:
            got = None if part is None else f"{part.dtype} {list(part.shape)}"
            raise ProtocolViolation(
                f"{server.url}/{protocol.EP_LM_HEAD_ROWS} sent {got} for rows {start}:{stop}; "
                f"expected {dtype} [{stop - start}, {hidden}]"
            )
        weight[start:stop].copy_(part)
    after = _served(server)
    if after.fingerprint != before.fingerprint or before.fingerprint != server.fingerprint:
        raise ModelMismatch(
            f"{server.url} changed its model while its LM head was fetched",
            {server.url: str(after.fingerprint)},
        )
    return weight


def _served(server: ServerSession) -> protocol.ModelInfoExtension:
    extension = server.control.post_json(protocol.EP_MODEL_INFO).get(protocol.MODEL_INFO_EXTENSION_KEY)
    if extension is None:
        raise CaptureUnsupported(f"{server.url} does not describe its model: not an eagle3-appliance server")
    try:
        return protocol.ModelInfoExtension.from_json(extension)
    except ValueError as exc:
        raise ProtocolViolation(f"{server.url}/{protocol.EP_MODEL_INFO}: {exc}") from None
