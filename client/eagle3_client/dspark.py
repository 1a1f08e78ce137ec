"""``RemoteDSparkTargetModel``: DSpark's target, served remotely.

A thin adapter over :class:`eagle3_client.remote.core.RemoteTarget`, like the DFlash one: the
same servers, options, fleet, data planes and async requests. The capture
(:meth:`eagle3_client.capture.Capture.dspark`) is the recipe's ``target_layer_ids`` (strictly
increasing; ``-1`` is the embedding output, the last layer the post-norm hidden state) and the
post-norm final hidden state, computed on the server as upstream's ``HFDSparkTargetModel``
does. Every server negotiates it in its ``/session``; an upstream server (or an appliance without
DSpark support) is refused with :class:`~eagle3_client.errors.CaptureUnsupported` before any
batch is sent.

The surface is the one NeMo AutoModel's DSpark recipe uses of ``HFDSparkTargetModel``:
``generate_batch`` returning upstream's ``DSparkTargetBatch`` (when AutoModel is installed; an
equivalent local dataclass otherwise), ``target_layer_ids``, ``get_input_embeddings()`` and
``get_output_embeddings()`` (the LM head, fetched once in bounded chunks as the DFlash adapter does).

Vision inputs (upstream's ``multimodal: true``): ``generate_batch(..., **mm_kwargs)`` sends the
tensors (``pixel_values``, ``image_grid_thw``, ...) beside the batch; an appliance serving a
vision-language checkpoint passes them to the model's forward as upstream's wrapper does, and any
other server refuses the request (422 naming them). Nothing is dropped on either side (docs/dspark.md).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from eagle3_client.capture import KEY_HIDDEN_STATES, KEY_LAST_HIDDEN_STATES, Capture, dspark_batch, dspark_batch_type
from eagle3_client.dflash import LMHeadTarget
from eagle3_client.remote.core import RemoteResult
from eagle3_client.remote.request import Packing
from eagle3_client.transports.dataplane import Answer

__all__ = ["RemoteDSparkTargetModel", "dspark_batch_type"]


class RemoteDSparkTargetModel(LMHeadTarget):
    """DSpark target whose forwards run on remote appliances.

    Usage::

        target = RemoteDSparkTargetModel.from_urls(["http://node3:8001"], target_layer_ids=[-1, 9, 17, 35])
        batch = target.generate_batch(input_ids, attention_mask, loss_mask)   # DSparkTargetBatch
        lm_head, embed = target.get_output_embeddings(), target.get_input_embeddings()
        target.close()

    Options: exactly those of :class:`eagle3_client.backend.RemoteEagle3TargetModel` (data
    plane, auth token, leases, timeouts, fleet); ``encoding`` does not apply (the answer is the
    features and the final norm's output, sent as computed).
    """

    def __init__(
        self,
        urls: Sequence[str] | str | os.PathLike[str] | None,
        *,
        target_layer_ids: Sequence[int],
        device: torch.device | str = "cpu",
        headers: dict[str, str] | None = None,
        **options: Any,
    ) -> None:
        layers = [int(i) for i in target_layer_ids]
        if not layers:
            raise ValueError("DSpark requires at least one target_layer_id.")
        if any(b <= a for a, b in zip(layers, layers[1:], strict=False)):
            raise ValueError(f"DSpark target_layer_ids must be strictly increasing, got {layers}")
        self.target_layer_ids = layers
        super().__init__(urls, device=device, headers=headers, capture=Capture.dspark(layers), **options)

    @classmethod
    def from_urls(
        cls,
        urls: Sequence[str] | str | os.PathLike[str] | None,
        *,
        target_layer_ids: Sequence[int],
        device: torch.device | str = "cpu",
        **options: Any,
    ) -> RemoteDSparkTargetModel:
        """Like ``RemoteEagle3TargetModel.from_urls``, with the layers to capture."""
        return cls(urls, target_layer_ids=target_layer_ids, device=device, **options)

    # -- what the recipe calls ----------------------------------------------------------

    def get_output_embeddings(self) -> torch.nn.Linear:
        """The target's LM head (frozen, no bias), fetched once in bounded chunks and cached."""
        return self.lm_head_linear()

    # -- requests ----------------------------------------------------------------------

    @torch.no_grad()
    def generate_batch(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        loss_mask: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        seq_lens: torch.Tensor | None = None,
        doc_remaining: torch.Tensor | None = None,
        **mm_kwargs: torch.Tensor,
    ) -> Any:
        """Upstream's ``HFDSparkTargetModel.generate_batch``: packed rows as the base class sends them;
        ``mm_kwargs`` (a vision-language target's tensors, by its forward's parameter names) sent as
        the request's vision inputs (not with packed rows)."""
        return self._request_batch(
            input_ids, attention_mask, loss_mask, position_ids, seq_lens, doc_remaining, vision=mm_kwargs
        )

    def generate_batch_async(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        loss_mask: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        seq_lens: torch.Tensor | None = None,
        doc_remaining: torch.Tensor | None = None,
        **mm_kwargs: torch.Tensor,
    ) -> RemoteResult:
        """:meth:`generate_batch` in the background: a handle with ``result(timeout)`` and ``cancel()``."""
        result: RemoteResult = self._request_batch(
            input_ids,
            attention_mask,
            loss_mask,
            position_ids,
            seq_lens,
            doc_remaining,
            vision=mm_kwargs,
            background=True,
        )
        return result

    # -- decoding ----------------------------------------------------------------------

    def _to_batch(
        self,
        answer: Answer,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        loss_mask: torch.Tensor,
        packing: Packing | None,
    ) -> Any:
        tensors = answer.tensors
        return dspark_batch(
            tensors.get(KEY_HIDDEN_STATES),
            tensors.get(KEY_LAST_HIDDEN_STATES),
            input_ids,
            loss_mask,
            None if packing is None else packing.on(self._device),
            self._device,
        )
