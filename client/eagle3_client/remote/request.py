"""One ``/generate`` body from a recipe's ``generate_batch`` arguments, for every adapter.

The recipes (EAGLE-3 and the DFlash family alike) pass upstream's three tensors and, for packed
rows, ``position_ids``, ``seq_lens`` and ``doc_remaining`` together. :func:`encode_request`
describes the call as one :class:`eagle3_client.protocol.GenerateRequest` (the session's capture
and whether it is packed), writes its wire body, and keeps the packing metadata the batch
returns to the trainer unchanged, as the co-located wrappers do.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from eagle3_client import protocol, wire
from eagle3_client.capture import EAGLE3, MAX_VISION_INPUTS, Capture

__all__ = ["Packing", "encode_request"]


@dataclass(frozen=True)
class Packing:
    """A packed batch's metadata as the caller gave it; the batch carries it unshifted, as co-located does."""

    position_ids: torch.Tensor
    seq_lens: torch.Tensor
    doc_remaining: torch.Tensor

    def on(self, device: torch.device) -> dict[str, torch.Tensor]:
        return {key: getattr(self, key).to(device) for key in protocol.PACKING_KEYS}


def encode_request(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    loss_mask: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    seq_lens: torch.Tensor | None = None,
    doc_remaining: torch.Tensor | None = None,
    *,
    capture: Capture = EAGLE3,
    vision: Mapping[str, torch.Tensor] | None = None,
) -> tuple[protocol.GenerateRequest, bytes, Packing | None]:
    """The request, its wire body, and the packing to put on the batch (None: unpacked, upstream's body).

    ``ValueError`` when only some of the packing tensors are given: a half-packed batch would be
    run as plain rows without any other sign. ``vision``: a ViSpec, MSD or DSpark request's vision tensors
    by the target forward's parameter names (the server refuses names its forward lacks).
    """
    vision_keys = _vision_keys(capture, vision or {})
    packed = {"position_ids": position_ids, "seq_lens": seq_lens, "doc_remaining": doc_remaining}
    given = [key for key, value in packed.items() if value is not None]
    if given and len(given) != len(packed):
        missing = [key for key in packed if key not in given]
        raise ValueError(f"packed rows need all of position_ids, seq_lens and doc_remaining; {missing} missing")
    if given and vision_keys:
        raise ValueError(f"a {capture.label} request carries vision inputs or packed rows, not both")
    request = protocol.GenerateRequest(capture=capture, packed=bool(given), vision=vision_keys)
    tensors = {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask, **packed}
    tensors.update(vision or {})
    payload = wire.encode({key: tensors[key] for key in request.keys})
    packing = None
    if request.packed:
        assert position_ids is not None and seq_lens is not None and doc_remaining is not None
        packing = Packing(position_ids, seq_lens, doc_remaining)
    return request, payload, packing


def _vision_keys(capture: Capture, vision: Mapping[str, object]) -> tuple[str, ...]:
    """The vision tensors' names in wire order; ``ValueError``/``TypeError`` naming what cannot be sent."""
    if not vision:
        return ()
    if not capture.takes_vision:
        raise ValueError(f"a {capture.label} request carries no vision inputs, got {sorted(vision)}")
    taken = sorted(set(vision) & set(protocol.SAMPLE_INPUT_KEYS))
    if taken:
        raise ValueError(f"vision inputs may not be named {taken}: the request's own keys")
    if len(vision) > MAX_VISION_INPUTS:
        raise ValueError(f"{len(vision)} vision inputs {sorted(vision)}; at most {MAX_VISION_INPUTS}")
    bad = sorted(name for name, value in vision.items() if not isinstance(value, torch.Tensor))
    if bad:
        raise TypeError(f"vision inputs must be tensors; {bad} are not")
    return tuple(sorted(vision))
