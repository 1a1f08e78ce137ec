"""Packed rows in the forward: several documents per row, none attending to another.

The recipe's ``packed_sequence_size`` concatenates short documents into fixed-width rows. The
co-located target (upstream's ``HFEagle3TargetModel``) then runs its forward with
per-document ``position_ids`` and, per attention backend:

* SDPA / eager: a ``[B, 1, T, T]`` additive mask, ``0`` where a position may attend
  (same document, not later) and ``finfo(dtype).min`` elsewhere (:func:`block_causal_mask`);
* FlashAttention: ``attention_mask=None``; transformers finds the documents from the points
  where ``position_ids`` restart, which it does only for a batch of one row.

:func:`packed_forward_inputs` makes the same choice, so a served packed answer has the bits of
the co-located packed path.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from eagle3_appliance.core.inputs import Packing

__all__ = ["block_causal_mask", "flash_attention", "packed_forward_inputs", "packing_refusal"]


def flash_attention(model: Any) -> bool:
    """Whether the model runs FlashAttention (documents from ``position_ids``; one row per forward)."""
    return "flash" in (getattr(model.config, "_attn_implementation", None) or "")


def packing_refusal(model: Any) -> str | None:
    """Why this model cannot run packed rows, or None when it can."""
    if "position_ids" not in inspect.signature(model.forward).parameters:
        return f"{type(model).__name__}.forward takes no position_ids, which packed documents need"
    return None


def block_causal_mask(
    seq_lens: torch.Tensor, *, seq_length: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """The ``[B, 1, T, T]`` additive mask of packed rows: causal within a document, closed across.

    ``seq_lens`` is ``[B, max_docs]``, 0-padded, each length in ``[0, seq_length]`` and each row
    summing to ``seq_length`` (the tail pad belongs to the last document). A row that does not is
    refused with ``ValueError``: its document boundaries would be wrong without any other sign.
    """
    if seq_lens.dim() != 2:
        raise ValueError(f"seq_lens must be [batch, max_docs], got shape {list(seq_lens.shape)}")
    if seq_lens.numel() and (int(seq_lens.min()) < 0 or int(seq_lens.max()) > seq_length):
        # Checked before the sum, which wraps in int64 (four lengths of 2^62 sum to 0).
        low, high = int(seq_lens.min()), int(seq_lens.max())
        raise ValueError(f"seq_lens must lie in [0, {seq_length}], got lengths in [{low}, {high}]")
    sums = seq_lens.sum(dim=1)
    if not bool((sums == seq_length).all()):
        raise ValueError(f"every row of seq_lens must sum to the row length {seq_length}, got {sums.tolist()}")
    positions = torch.arange(seq_length, device=device)
    ends = seq_lens.to(device).cumsum(dim=1)  # where each document stops (exclusive)
    # A position's document is the number of documents that ended at or before it.
    document = (positions[None, :, None] >= ends[:, None, :]).sum(dim=-1)  # [B, T]
    same_document = document[:, :, None] == document[:, None, :]
    not_later = positions[:, None] >= positions[None, :]
    closed = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=device)
    open_ = torch.zeros((), dtype=dtype, device=device)
    return torch.where(same_document & not_later, open_, closed).unsqueeze(1)


def packed_forward_inputs(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, packing: Packing | None
) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
    """The ``attention_mask`` to run the model with, and the extra keyword arguments (``position_ids``).

    Unpacked: the request's own 2-D mask and nothing else, exactly as before.
    """
    if packing is None:
        return attention_mask, {}
    extra = {"position_ids": packing.position_ids}
    if flash_attention(model):
        if input_ids.shape[0] != 1:
            raise ValueError(f"a FlashAttention target packs one row per forward, got {input_ids.shape[0]}")
        return None, extra
    dtype = next(model.parameters()).dtype  # the co-located wrapper's choice
    mask = block_causal_mask(packing.seq_lens, seq_length=int(input_ids.shape[1]), dtype=dtype, device=input_ids.device)
    return mask, extra
