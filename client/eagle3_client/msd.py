"""``RemoteMSDTargetModel``: MSD's vision-language target, served remotely.

A thin adapter over :class:`eagle3_client.remote.core.RemoteTarget` (through
:class:`eagle3_client.vlm.RemoteVisionTarget`), negotiated per session like the ViSpec one
(:meth:`eagle3_client.capture.Capture.msd`). The surface is the one NeMo AutoModel's MSD
training uses of ``HFMSDTargetModel``: ``generate_batch(*, loss_mask, model_inputs)`` returning
upstream's ``MSDTargetBatch`` (an equivalent local dataclass without AutoModel) and
``get_lm_head()``. ``model_inputs`` holds ``input_ids``, ``attention_mask`` and the vision
tensors, each a parameter of the target model's forward (the server refuses any other, 422).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from eagle3_client.capture import Capture, msd_batch, msd_batch_type
from eagle3_client.remote.core import RemoteResult
from eagle3_client.vlm import RemoteVisionTarget

__all__ = ["RemoteMSDTargetModel", "msd_batch_type"]


class RemoteMSDTargetModel(RemoteVisionTarget):
    """MSD target whose forwards run on remote appliances serving a vision-language checkpoint.

    Usage::

        target = RemoteMSDTargetModel.from_urls(["http://node3:8001"])
        batch = target.generate_batch(loss_mask=mask, model_inputs={"input_ids": ids, "attention_mask": am,
                                                                     "pixel_values": pixels, ...})
        lm_head = target.get_lm_head()
        target.close()
    """

    CAPTURE = Capture.msd()

    @torch.no_grad()
    def generate_batch(  # type: ignore[override]  # upstream's MSD signature, not EAGLE-3's
        self, *, loss_mask: torch.Tensor, model_inputs: Mapping[str, torch.Tensor]
    ) -> Any:
        """Upstream's ``HFMSDTargetModel.generate_batch``: ``MSDTargetBatch`` on this target's device.

        ``loss_mask`` ``[B,T]`` is already aligned to next-token logits (its last position is
        dropped, as upstream does); ``ValueError`` when ``model_inputs`` lacks ``input_ids`` or
        ``attention_mask``.
        """
        return self.generate_batch_async(loss_mask=loss_mask, model_inputs=model_inputs).result()

    def generate_batch_async(  # type: ignore[override]
        self, *, loss_mask: torch.Tensor, model_inputs: Mapping[str, torch.Tensor]
    ) -> RemoteResult:
        """:meth:`generate_batch` in the background: a handle with ``result(timeout)`` and ``cancel()``."""
        missing = [key for key in ("input_ids", "attention_mask") if key not in model_inputs]
        if missing:
            raise ValueError(f"MSD requires {' and '.join(missing)} in model_inputs to align draft supervision.")
        input_ids, attention_mask = model_inputs["input_ids"], model_inputs["attention_mask"]
        vision = {k: v for k, v in model_inputs.items() if k not in ("input_ids", "attention_mask")}
        return self._submit_vision(
            input_ids,
            attention_mask,
            loss_mask,
            vision,
            lambda answer: msd_batch(answer, input_ids, attention_mask, loss_mask, self.image_token_id, self._device),
        )
