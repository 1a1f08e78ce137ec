"""What a validated request hands to the rest of the pipeline: the batch and the draft vocabulary.

These types sit at the bottom of the server's module graph: validation builds them, and the
forward, supervision and transfer steps only read them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

__all__ = ["Allocator", "GenerateInputs", "Packing", "VocabMapping"]

# ``alloc(shape, dtype)``: memory for a result (a pooled block, or a fresh tensor).
Allocator = Callable[[Sequence[int], torch.dtype], torch.Tensor]


@dataclass(frozen=True)
class Packing:
    """How documents are packed into the rows of a batch (the recipe's ``packed_sequence_size``).

    ``position_ids`` int64 ``[B,T]`` restart at every document; ``seq_lens`` int64
    ``[B,max_docs]`` are the 0-padded document lengths, each row summing to ``T``;
    ``doc_remaining`` int64 ``[B,T]`` is checked and kept for the trainer, never used by the forward.
    """

    position_ids: torch.Tensor
    seq_lens: torch.Tensor
    doc_remaining: torch.Tensor

    def to(self, device: torch.device) -> Packing:
        return Packing(*(t.to(device) for t in (self.position_ids, self.seq_lens, self.doc_remaining)))


@dataclass(frozen=True)
class GenerateInputs:
    """One ``/generate`` batch: ``input_ids``, ``attention_mask``, ``loss_mask``, each ``[B,T]``.

    ``packing`` is set for a packed request: the forward then isolates the documents of a row.
    ``vision``: a ViSpec or MSD request's vision tensors by forward parameter name (validated).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor
    packing: Packing | None = None
    vision: Mapping[str, torch.Tensor] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def tokens(self) -> int:
        return int(self.input_ids.numel())

    def to(self, device: torch.device) -> GenerateInputs:
        packing = None if self.packing is None else self.packing.to(device)
        vision = {name: t.to(device) for name, t in self.vision.items()}
        return GenerateInputs(
            self.input_ids.to(device), self.attention_mask.to(device), self.loss_mask.to(device), packing, vision
        )


@dataclass(frozen=True)
class VocabMapping:
    """The draft vocabulary: ``selected_token_ids`` int64 ``[D]``, ``selected_token_mask`` bool ``[V]``.

    ``version`` is the number our client gave this mapping (``X-Eagle3-Mapping``), named on
    every answer computed under it; None for upstream clients, which never send one.
    """

    selected_token_ids: torch.Tensor
    selected_token_mask: torch.Tensor
    version: int | None = None

    @property
    def draft_vocab_size(self) -> int:
        return int(self.selected_token_ids.numel())

    def to(self, device: torch.device) -> VocabMapping:
        return VocabMapping(self.selected_token_ids.to(device), self.selected_token_mask.to(device), self.version)
