"""What the ViSpec and MSD adapters share: vision inputs on a request, the image token id, the LM head.

A ViSpec or MSD session's answer is the target forward's embedding output (vision features
spliced in), last hidden state and logits, unshifted (:data:`eagle3_client.capture.VLM_KEYS`).
The adapters build upstream's batch from them with :func:`eagle3_client.capture.vispec_batch` /
:func:`~eagle3_client.capture.msd_batch`, the builders a stream's loaders use too: the shift
left with a zero tail and the image mask (``input_ids == image_token_id``, the id the server
names in its session reply) are copies and comparisons, so the batch is the co-located
wrapper's bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from eagle3_client.capture import shift_left
from eagle3_client.dflash import FixedCaptureTarget
from eagle3_client.errors import ProtocolViolation
from eagle3_client.remote.core import RemoteResult
from eagle3_client.remote.request import encode_request
from eagle3_client.remote.session import ServerSession

__all__ = ["RemoteVisionTarget", "shift_left"]


class RemoteVisionTarget(FixedCaptureTarget):
    """A ViSpec or MSD target on remote appliances: the capture (``CAPTURE``, set by each adapter),
    the image token id, the LM head."""

    _image_token_id: int | None = None

    @property
    def image_token_id(self) -> int:
        """The target's image placeholder token id, as its servers name it in their session reply."""
        if self._image_token_id is None:

            def read(server: ServerSession) -> int:
                if server.image_token_id is None:  # its session join refused such a server; kept for the type
                    raise ProtocolViolation(f"{server.url} named no image token id")
                return server.image_token_id

            self._image_token_id = self._any(read)
        return self._image_token_id

    def _request(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        loss_mask: torch.Tensor,
        vision: Mapping[str, torch.Tensor],
    ) -> tuple[bytes, frozenset[str]]:
        request, payload, _ = encode_request(
            input_ids, attention_mask, loss_mask, capture=self._capture, vision=dict(vision)
        )
        return payload, request.capabilities

    def _submit_vision(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        loss_mask: torch.Tensor,
        vision: Mapping[str, torch.Tensor],
        build: Callable[[Mapping[str, torch.Tensor]], Any],
    ) -> RemoteResult:
        """Send one request; ``build`` makes the batch from the answer's tensors."""
        payload, needs = self._request(input_ids, attention_mask, loss_mask, vision)
        self.image_token_id  # noqa: B018 - known before the answer is converted (a session is joined)
        return self._submit(payload, lambda answer: build(answer.tensors), needs)
