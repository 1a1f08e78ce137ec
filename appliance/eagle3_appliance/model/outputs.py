"""What one target forward produced: the aux states, the logits (whole or as a sliced head), the LM head's input.

Its own module because every step after the forward reads it (supervision, projection, the
DFlash capture), while :mod:`eagle3_appliance.model.target` is the forward step itself.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from eagle3_appliance.core.inputs import Allocator
from eagle3_appliance.model.head_slices import LogitSlices

__all__ = ["ForwardOutputs"]


@dataclass
class ForwardOutputs:
    """One forward: aux states ``[B,T,3H]``, the logits ``[B,T,V]`` (unshifted), and the LM head's input if captured.

    The logits are either ``logits`` (materialised by the model's own head) or ``head``: the
    head run over slices on demand (:mod:`eagle3_appliance.model.head_slices`); exactly one is set.
    Consumers read them through :meth:`logit_slices` and never need both.
    """

    aux_hidden_states: torch.Tensor
    logits: torch.Tensor | None
    final_hidden: torch.Tensor | None = None
    head: LogitSlices | None = None

    @property
    def logits_shape(self) -> tuple[int, int, int]:
        if self.logits is not None:
            batch, seq_len, width = self.logits.shape
            return int(batch), int(seq_len), int(width)
        assert self.head is not None
        return self.head.shape

    @property
    def logits_dtype(self) -> torch.dtype:
        return self.logits.dtype if self.logits is not None else self._head().dtype

    @property
    def device(self) -> torch.device:
        return self.logits.device if self.logits is not None else self._head().device

    @property
    def longest_slice(self) -> int:
        """Rows of the longest slice :meth:`logit_slices` yields."""
        return self.logits_shape[1] if self.logits is not None else self._head().longest

    def _head(self) -> LogitSlices:
        if self.head is None:
            raise RuntimeError("a forward without logits and without a sliced head")
        return self.head

    def logit_slices(self) -> Iterator[tuple[int, int, torch.Tensor]]:
        """``(b, start, rows)``: logits rows ``start:start+n`` of batch row ``b``, in order (one slice per
        batch row when materialised). A sliced head's ``rows`` are valid until the next slice is asked for."""
        if self.logits is not None:
            for b in range(self.logits.shape[0]):
                yield b, 0, self.logits[b]
        else:
            yield from self._head().slices()

    def full_logits(self, alloc: Allocator | None = None) -> torch.Tensor:
        """The whole ``[B,T,V]`` logits (a full-logits answer), computed slice by slice if need be."""
        return self.logits if self.logits is not None else self._head().materialize(alloc)

    def rows(self, start: int, stop: int) -> ForwardOutputs:
        """The outputs of batch rows ``start:stop`` (one request of a stacked forward)."""
        hidden = None if self.final_hidden is None else self.final_hidden[start:stop]
        logits = None if self.logits is None else self.logits[start:stop]
        head = None if self.head is None else self.head.narrow(start, stop)
        return ForwardOutputs(self.aux_hidden_states[start:stop], logits, hidden, head)
