"""``RemoteEagleTargetModel``: the EAGLE-1/EAGLE-2 target (and ViSpec's text-only stage 1), served remotely.

A thin adapter over :class:`eagle3_client.remote.core.RemoteTarget`, like the DSpark one: the
same servers, options, fleet, data planes, packed rows and async requests. The capture
(:meth:`eagle3_client.capture.Capture.eagle`) takes no layers: the server sends the final norm's
output (the base model's last hidden state) and the LM head's output on it, unshifted
(:data:`eagle3_client.capture.EAGLE_KEYS`), computed as upstream's ``HFEagleTargetModel`` does;
this adapter shifts them left with a zero tail as that wrapper does (a copy, so nothing computed
moves off the server). Every server negotiates the capture in its ``/session``; an upstream server
(or an appliance without it) is refused with :class:`~eagle3_client.errors.CaptureUnsupported`
before any batch is sent.

The surface is the one NeMo AutoModel's EAGLE-1/2 and ViSpec stage-1 recipes use of
``HFEagleTargetModel``: ``generate_batch(input_ids, attention_mask, loss_mask, position_ids=None,
seq_lens=None, doc_remaining=None)`` returning upstream's ``EagleTargetBatch`` (an equivalent
local dataclass without AutoModel), ``get_input_embeddings()`` and ``get_lm_head()`` (fetched
once, in bounded chunks, as the DFlash adapter fetches it).
"""

from __future__ import annotations

from typing import Any

import torch

from eagle3_client.capture import KEY_LAST_HIDDEN_STATES, KEY_LOGITS, Capture, eagle_batch_type
from eagle3_client.dflash import FixedCaptureTarget
from eagle3_client.errors import ProtocolViolation
from eagle3_client.remote.request import Packing
from eagle3_client.transports.dataplane import Answer
from eagle3_client.vlm import shift_left

__all__ = ["RemoteEagleTargetModel", "eagle_batch_type"]


class RemoteEagleTargetModel(FixedCaptureTarget):
    """EAGLE-1/EAGLE-2 target whose forwards run on remote appliances.

    Usage::

        target = RemoteEagleTargetModel.from_urls(["http://node3:8001"])
        batch = target.generate_batch(input_ids, attention_mask, loss_mask)   # EagleTargetBatch
        embed, lm_head = target.get_input_embeddings(), target.get_lm_head()
        target.close()

    Options: exactly those of :class:`eagle3_client.backend.RemoteEagle3TargetModel` (data
    plane, auth token, leases, timeouts, fleet); ``encoding`` does not apply (the answer is the
    last hidden state and its logits, sent as computed).
    """

    CAPTURE = Capture.eagle()

    # ``generate_batch`` / ``generate_batch_async``: RemoteTarget's, upstream's signature (packed rows included).

    def _to_batch(
        self,
        answer: Answer,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        loss_mask: torch.Tensor,
        packing: Packing | None,
    ) -> Any:
        dev = self._device
        last, logits = answer.tensors.get(KEY_LAST_HIDDEN_STATES), answer.tensors.get(KEY_LOGITS)
        if last is None or logits is None or last.shape[:2] != input_ids.shape or logits.shape[:2] != input_ids.shape:
            shapes = {k: None if v is None else list(v.shape) for k, v in answer.tensors.items()}
            raise ProtocolViolation(f"an eagle answer has {shapes} for a batch of {list(input_ids.shape)}")
        hidden = last.to(dev)
        return eagle_batch_type()(
            input_hidden_states=hidden,
            target_hidden_states=shift_left(hidden),
            target_logits=shift_left(logits.to(dev)),
            input_ids=shift_left(input_ids.to(dev)),
            attention_mask=attention_mask.to(dev),
            loss_mask=shift_left(loss_mask.to(dev)),
            **({} if packing is None else packing.on(dev)),
        )
