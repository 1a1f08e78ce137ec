"""``RemoteVispecTargetModel``: ViSpec's vision-language target, served remotely.

A thin adapter over :class:`eagle3_client.remote.core.RemoteTarget` (through
:class:`eagle3_client.vlm.RemoteVisionTarget`): the same servers, options, fleet, data planes
and async requests. The capture (:meth:`eagle3_client.capture.Capture.vispec`) is negotiated in
every server's ``/session``: a server whose model is not a vision-language one refuses it there
(422 naming why), an upstream server is refused with
:class:`~eagle3_client.errors.CaptureUnsupported`, before any batch is sent.

The surface is the one NeMo AutoModel's ViSpec recipe uses of ``HFVispecTargetModel``:
``generate_batch(input_ids, attention_mask, loss_mask, **multimodal_inputs)`` returning
upstream's ``VispecTargetBatch`` (an equivalent local dataclass without AutoModel),
``get_input_embeddings()`` and ``get_lm_head()`` (fetched once, in bounded chunks).
Unlike upstream, a vision tensor the target's base-model forward does not declare is refused by
the server (422 naming it), not dropped.
"""

from __future__ import annotations

from typing import Any

import torch

from eagle3_client.capture import Capture, vispec_batch, vispec_batch_type
from eagle3_client.remote.core import RemoteResult
from eagle3_client.vlm import RemoteVisionTarget

__all__ = ["RemoteVispecTargetModel", "vispec_batch_type"]


class RemoteVispecTargetModel(RemoteVisionTarget):
    """ViSpec target whose forwards run on remote appliances serving a vision-language checkpoint.

    Usage::

        target = RemoteVispecTargetModel.from_urls(["http://node3:8001"])
        batch = target.generate_batch(input_ids, attention_mask, loss_mask,
                                      pixel_values=pixels, image_grid_thw=grid, mm_token_type_ids=types)
        embed, lm_head = target.get_input_embeddings(), target.get_lm_head()
        target.close()

    Options: those of :class:`eagle3_client.backend.RemoteEagle3TargetModel` (data plane, auth
    token, leases, timeouts, fleet); ``encoding`` does not apply.
    """

    CAPTURE = Capture.vispec()

    @torch.no_grad()
    def generate_batch(  # type: ignore[override]  # upstream's ViSpec signature, not EAGLE-3's
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        loss_mask: torch.Tensor,
        **multimodal_inputs: torch.Tensor,
    ) -> Any:
        """Upstream's ``HFVispecTargetModel.generate_batch``: ``VispecTargetBatch`` on this target's device.

        ``multimodal_inputs``: the processor's vision tensors (``pixel_values`` ``[patches, dim]``,
        ``image_grid_thw`` ``[images, 3]``, ...), each a parameter of the target's base-model forward.
        """
        return self.generate_batch_async(input_ids, attention_mask, loss_mask, **multimodal_inputs).result()

    def generate_batch_async(  # type: ignore[override]
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        loss_mask: torch.Tensor,
        **multimodal_inputs: torch.Tensor,
    ) -> RemoteResult:
        """:meth:`generate_batch` in the background: a handle with ``result(timeout)`` and ``cancel()``."""
        return self._submit_vision(
            input_ids,
            attention_mask,
            loss_mask,
            multimodal_inputs,
            lambda answer: vispec_batch(
                answer, input_ids, attention_mask, loss_mask, self.image_token_id, self._device
            ),
        )
