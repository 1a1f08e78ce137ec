"""The supervision projection written into reused memory, bit-identical to the reference projection.

Why: the straightforward projection (``argmax``, ``index_select``, ``softmax``, ``cat`` on
``[B,T,V]`` logits) allocates four payload-sized tensors per request, and on the CPU each
one is fresh memory that page-faults on first touch (measured ~2 s of a 2048x32k request,
more than the forward itself; ``index_select`` on the 3-d logits is also far slower than
on 2-d row blocks). Here every large result goes into memory from an allocator (a
:class:`eagle3_client.transports.buffers.BufferPool` on the CPU), and the work runs over blocks of rows so
that the gathered draft-vocab rows stay in cache between the gather and the softmax.

The logits may come as one tensor or as slices of the sequence computed on demand
(:mod:`eagle3_appliance.model.head_slices`): each slice's rows are projected before the next
slice exists, so the full-vocabulary logits of a long request never do.

Why the bits are the same as :func:`eagle3_appliance.model.supervision.reference_projection`: every operation
here is row-wise (argmax, gather and softmax over the last dimension), each output row is
computed by the same kernel from the same input row, and rows are only *placed* one
position earlier (the left shift) instead of being copied there afterwards. The zero tail
row is produced exactly as the reference produces it. ``tests/test_projection.py`` checks
equality bit for bit, including ties, bfloat16 logits and several batch shapes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from eagle3_appliance.core.inputs import Allocator, VocabMapping
from eagle3_appliance.model.outputs import ForwardOutputs

__all__ = ["default_chunk_rows", "project_into", "shift_left", "tail_probs"]

# Rows per block on the CPU (rows x D x 4 bytes of gathered draft-vocab logits): small
# enough to keep the scratch bounded and mostly in cache, large enough that the per-call
# cost of three parallel ops per block stays small on a busy machine (measured on 2 cores:
# 2 MiB blocks were fastest single-threaded but 5x slower under CPU contention).
_CPU_BLOCK_BYTES = 16 * 1024 * 1024


def shift_left(x: torch.Tensor) -> torch.Tensor:
    """``cat(x[:, 1:], zeros_like(x[:, :1]), dim=1)``: the next-token alignment of protocol §1.4."""
    return torch.cat((x[:, 1:], torch.zeros_like(x[:, :1])), dim=1)


def tail_probs(dtype: torch.dtype, draft_vocab: int, device: torch.device) -> torch.Tensor:
    """The last position's probabilities ``[1, 1, D]``, made as the reference makes them: its
    logits row is the shifted-in zeros (of the logits dtype), so its softmax, in float32."""
    zeros = torch.zeros((1, 1, 1), dtype=dtype, device=device)
    return torch.softmax(zeros.expand(-1, -1, draft_vocab).float(), dim=-1)


def default_chunk_rows(device: torch.device, draft_vocab: int, seq_len: int) -> int:
    """Rows per block: cache-sized on the CPU, the whole sequence on an accelerator."""
    if device.type != "cpu":
        return max(1, seq_len)
    return max(1, _CPU_BLOCK_BYTES // max(1, draft_vocab * 4))


def _torch_empty(device: torch.device) -> Allocator:
    return lambda shape, dtype: torch.empty(tuple(shape), dtype=dtype, device=device)


def project_into(
    aux_hidden_states: torch.Tensor,
    logits: torch.Tensor | ForwardOutputs,
    input_ids: torch.Tensor,
    loss_mask: torch.Tensor,
    mapping: VocabMapping,
    *,
    alloc: Allocator | None = None,
    chunk_rows: int | None = None,
    on_rows: Callable[[torch.Tensor, int], None] | None = None,
) -> dict[str, torch.Tensor]:
    """The ``/generate`` supervision (protocol §1.4-5), with ``target_probs`` in ``alloc``'d memory.

    ``logits``: the ``[B,T,V]`` tensor, or a forward's outputs whose LM head runs over slices
    (each slice is projected before the next is computed). ``alloc(shape, dtype)`` must return
    a contiguous tensor on the logits' device; it is called for the output probabilities, the
    argmax indices and two small scratch blocks.

    ``on_rows(probs, n)``, if given, is told (on this thread) when the first ``n`` rows of
    ``target_probs`` flattened to ``[B*T, D]`` are final: once with 0 right after it is
    allocated, then after every slice. A streamed answer sends those rows while later
    slices are computed (:mod:`eagle3_appliance.dataplanes.streaming`).
    """
    out = logits if isinstance(logits, ForwardOutputs) else ForwardOutputs(aux_hidden_states, logits)
    device = out.device
    alloc = alloc or _torch_empty(device)
    batch, seq_len, _ = out.logits_shape
    ids = mapping.selected_token_ids.to(device)
    token_mask = mapping.selected_token_mask.to(device)
    draft = ids.numel()
    rows_per_block = max(1, chunk_rows or default_chunk_rows(device, draft, seq_len))

    probs = alloc((batch, seq_len, draft), torch.float32)
    top = alloc((batch, seq_len), torch.int64)
    top[:, seq_len - 1 :] = 0  # the shifted-in zero row: argmax of zeros is 0
    block = min(rows_per_block, max(min(seq_len - 1, out.longest_slice), 1))  # scratch within one slice
    gathered = alloc((block, draft), out.logits_dtype)
    widened = alloc((block, draft), torch.float32) if out.logits_dtype != torch.float32 else None
    # The tail row first, so that a batch row is final as soon as its last slice is projected.
    probs[:, seq_len - 1 :].copy_(tail_probs(out.logits_dtype, draft, device).expand(batch, -1, -1))
    if on_rows is not None:
        on_rows(probs, 0)

    for b, first, rows in out.logit_slices():
        # Output row t is computed from logits row t + 1 (the left shift of §1.4); row 0 is not used.
        end = first + rows.shape[0]
        for start in range(max(first, 1), end, block):
            stop = min(start + block, end)
            n = stop - start
            src = rows[start - first : stop - first]
            torch.argmax(src, dim=-1, out=top[b, start - 1 : stop - 1])
            chunk = gathered[:n]
            torch.index_select(src, -1, ids, out=chunk)
            if widened is not None:
                chunk = widened[:n].copy_(chunk)  # exactly ``.float()``
            torch.softmax(chunk, dim=-1, out=probs[b, start - 1 : stop - 1])
        if on_rows is not None:  # output rows up to end - 2 of row b are final (all of it after its last slice)
            on_rows(probs, b * seq_len + (seq_len if end >= seq_len else end - 1))

    shifted_loss_mask = shift_left(loss_mask)
    position_mask = (token_mask[top] & shifted_loss_mask.bool()).unsqueeze(-1)
    return {
        "aux_hidden_states": aux_hidden_states,
        "target_probs": probs,
        "position_mask": position_mask,
        "input_ids": shift_left(input_ids),
        "loss_mask": shifted_loss_mask,
    }
