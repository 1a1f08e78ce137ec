"""The LM head run over slices of the sequence, so that a request's full-vocabulary logits never exist at once.

Why: the logits ``[B,T,V]`` (and, before this module, the projection's scratch beside them) were
most of a ``/generate``'s working memory, yet every consumer reads them row by row (argmax,
gather, softmax). During the forward :func:`deferred_head` lets the model call its head on a
placeholder and keeps the head's input ``h`` (the final norm's output, ``[B,T,H]``, small);
:class:`LogitSlices` then computes ``head(h[b, start:stop])`` one slice at a time into one
reused buffer, and the supervision consumes each slice before the next is computed.

Why the bits are the same: the head is a plain bias-free ``nn.Linear`` (checked), so the whole
logits are one ``mm`` of ``[B*T,H]`` by the weight, and a slice is the same ``mm`` on a block of
those rows; each output element sums the same products in the same order as long as the
kernel does not switch to a small-matrix path, which the CPU's does below 12 rows. Slices are
therefore never shorter than :data:`MIN_SLICE_ROWS` (a short tail joins the slice before it),
and :meth:`eagle3_appliance.model.target.Target.slicing_refusal` checks once, bit for bit,
that the model's logits equal its head's output on sliced rows (which also catches anything
the model does after its head). On an accelerator the library may pick another kernel for
another row count, so there the server slices only what the unsliced path cannot hold
(``docs/operations.md``, "Long samples").
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from eagle3_appliance.core.inputs import Allocator

__all__ = ["MIN_SLICE_ROWS", "LogitSlices", "deferred_head", "slice_bounds"]

# No slice is shorter than this: CPU GEMM kernels take a small-matrix path below 12 rows
# (measured: 1-3, 5-7 and 9-11 rows sum in another order than the full product).
MIN_SLICE_ROWS = 16


def slice_bounds(seq_len: int, rows: int) -> list[tuple[int, int]]:
    """``[start, stop)`` slices of ``rows`` rows over ``seq_len``; a tail under MIN_SLICE_ROWS joins the one before."""
    rows = max(rows, MIN_SLICE_ROWS)
    bounds = [(start, min(start + rows, seq_len)) for start in range(0, seq_len, rows)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < MIN_SLICE_ROWS:
        bounds.pop()
        bounds[-1] = (bounds[-1][0], seq_len)
    return bounds


@contextlib.contextmanager
def deferred_head(head: nn.Linear) -> Iterator[dict[str, torch.Tensor]]:
    """For one forward: ``head`` returns an empty ``[..., 0]`` placeholder and ``slot["h"]`` keeps its input."""
    slot: dict[str, torch.Tensor] = {}

    def forward(x: torch.Tensor) -> Any:
        slot["h"] = x
        return x.new_empty((*x.shape[:-1], 0))

    head.forward = forward  # type: ignore[method-assign, assignment]
    try:
        yield slot
    finally:
        del head.forward  # the class's forward again


@dataclass
class LogitSlices:
    """The logits of one forward, computed on demand from the head's input ``h`` ``[B,T,H]``.

    ``alloc``, if given, supplies the one slice buffer (reused blocks on the CPU). The tensor
    :meth:`slices` yields is that buffer: read it before asking for the next slice.
    """

    hidden: torch.Tensor
    weight: torch.Tensor
    rows: int
    alloc: Allocator | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        batch, seq_len, _ = self.hidden.shape
        return int(batch), int(seq_len), int(self.weight.shape[0])

    @property
    def dtype(self) -> torch.dtype:
        return self.hidden.dtype

    @property
    def device(self) -> torch.device:
        return self.hidden.device

    @property
    def longest(self) -> int:
        """Rows of the longest slice."""
        return max(stop - start for start, stop in slice_bounds(self.shape[1], self.rows))

    def narrow(self, start: int, stop: int) -> LogitSlices:
        """The logits of batch rows ``start:stop`` (one request of a stacked forward)."""
        return LogitSlices(self.hidden[start:stop], self.weight, self.rows, self.alloc)

    def _empty(self, shape: tuple[int, ...], alloc: Allocator | None) -> torch.Tensor:
        out = alloc(shape, self.dtype) if alloc is not None else None
        if out is None or out.device != self.device:
            out = torch.empty(shape, dtype=self.dtype, device=self.device)
        return out

    def slices(self) -> Iterator[tuple[int, int, torch.Tensor]]:
        """``(b, start, logits)`` for every slice in order: ``logits`` are rows ``start:start+n`` of batch row ``b``."""
        batch, seq_len, width = self.shape
        bounds = slice_bounds(seq_len, self.rows)
        buffer = self._empty((self.longest, width), self.alloc)
        weight_t = self.weight.t()
        for b in range(batch):
            rows = self.hidden[b]
            for start, stop in bounds:
                out = buffer[: stop - start]
                # nn.Linear without a bias is matmul(x, weight.t()): the same mm on these rows.
                torch.matmul(rows[start:stop].contiguous(), weight_t, out=out)
                yield b, start, out

    def materialize(self, alloc: Allocator | None = None) -> torch.Tensor:
        """All the logits ``[B,T,V]`` (a full-logits answer needs them), filled slice by slice."""
        batch, seq_len, width = self.shape
        logits = self._empty((batch, seq_len, width), alloc)
        weight_t = self.weight.t()
        for b in range(batch):
            for start, stop in slice_bounds(seq_len, self.rows):
                torch.matmul(self.hidden[b, start:stop].contiguous(), weight_t, out=logits[b, start:stop])
        return logits
