"""The supervision step: one forward's outputs turned into the ``/generate`` answer, in the session's encoding.

:func:`reference_projection` is protocol §1.4-5 written out plainly; it is what "running the
target in-process" means, and what every other path is checked against. The served paths:

* ``probs`` (upstream's answer): :func:`eagle3_appliance.model.projection.project_into`, the same
  bits computed into reused memory.
* ``logits``: ``shift(logits[..., ids])`` in the model dtype (zero tail row). The client's
  ``softmax(x.float(), -1)`` is the reference's own last op on the same values.
* ``hidden``: ``shift(h)`` where ``h`` is the input of the LM head (captured only for
  sessions that use it). Valid only when ``logits == linear(h, lm_head.weight)``:
  :meth:`Target.hidden_refusal` checks that when a session asks for it.
* ``topk:K``: the K largest reference probabilities (float32, *not* renormalised, so their
  sum is the kept mass) and their indices, int16 when the draft vocabulary allows.

``position_mask``, shifted ``input_ids`` and ``loss_mask`` are the reference's in every encoding.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from eagle3_appliance.core.inputs import Allocator, GenerateInputs, VocabMapping
from eagle3_appliance.model.outputs import ForwardOutputs
from eagle3_appliance.model.projection import project_into, shift_left, tail_probs
from eagle3_appliance.model.target import Target
from eagle3_client import protocol
from eagle3_client.encodings import PROBS, Encoding, topk_index_dtype

__all__ = [
    "HIDDEN_TOLERANCE",
    "compare_to_reference",
    "encode",
    "in_process",
    "reference_projection",
    "supervision_equal",
]

# The documented bound on |target_probs - reference| for "hidden" (docs/encodings.md).
# Measured 0 on CPU for float32 and bfloat16; not bitwise by promise, because the client's
# [D,H] GEMM may sum in another order than the server's [V,H] one.
HIDDEN_TOLERANCE = 1e-6


def reference_projection(
    aux_hidden_states: torch.Tensor,
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    loss_mask: torch.Tensor,
    mapping: VocabMapping,
) -> dict[str, torch.Tensor]:
    """Project the target's logits onto the draft vocabulary (§1.4-5): the reference, bit for bit.

    Equivalent, element for element, to shifting the full ``[B,T,V]`` logits first and
    then taking argmax / index_select / softmax, but without materialising a shifted copy
    of the full-vocabulary logits: argmax, gather and softmax act row by row, so computing
    them on unshifted rows and shifting the (much smaller) results gives the same bits.
    The zero tail row is reproduced explicitly: argmax of a zero row is 0 and its softmax
    is the softmax of zeros, computed by the same kernel.
    """
    ids = mapping.selected_token_ids.to(logits.device)
    token_mask = mapping.selected_token_mask.to(logits.device)
    shifted_loss_mask = shift_left(loss_mask)

    shifted_top = shift_left(logits.argmax(dim=-1))  # a zero logits row has argmax 0
    position_mask = (token_mask[shifted_top] & shifted_loss_mask.bool()).unsqueeze(-1)

    probs = torch.softmax(logits.index_select(-1, ids).float(), dim=-1)
    zero_row = torch.softmax(torch.zeros_like(logits[:, :1, :1]).expand(-1, -1, ids.numel()).float(), dim=-1)
    target_probs = torch.cat((probs[:, 1:], zero_row), dim=1)

    return {
        "aux_hidden_states": aux_hidden_states,
        "target_probs": target_probs,
        "position_mask": position_mask,
        "input_ids": shift_left(input_ids),
        "loss_mask": shifted_loss_mask,
    }


def _masks(top: torch.Tensor, inputs: GenerateInputs, mapping: VocabMapping) -> dict[str, torch.Tensor]:
    """``position_mask`` and the shifted ids/loss mask from the unshifted argmax ``top`` ``[B,T]``, as the reference."""
    token_mask = mapping.selected_token_mask.to(top.device)
    shifted_loss_mask = shift_left(inputs.loss_mask)
    position_mask = (token_mask[shift_left(top)] & shifted_loss_mask.bool()).unsqueeze(-1)
    return {
        "position_mask": position_mask,
        "input_ids": shift_left(inputs.input_ids),
        "loss_mask": shifted_loss_mask,
    }


def _slice_pass(
    out: ForwardOutputs, mapping: VocabMapping, encoding: Encoding
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One pass over the logits, slice by slice: the argmax ``[B,T]`` and the encoding's own tensors.

    Every operation acts row by row on the rows of one slice (argmax, gather, softmax, top-k),
    so the results are the reference's bits whichever way the logits were computed.
    """
    batch, seq_len, _ = out.logits_shape
    device = out.device
    ids = mapping.selected_token_ids.to(device)
    top = torch.empty((batch, seq_len), dtype=torch.int64, device=device)
    result: dict[str, torch.Tensor] = {}
    draft = topk_values = topk_indices = None
    if encoding.kind == protocol.ENCODING_LOGITS:
        # shift_left(logits[..., ids]) in the model dtype, written one position earlier.
        draft = result[protocol.KEY_DRAFT_LOGITS] = torch.zeros(
            (batch, seq_len, ids.numel()), dtype=out.logits_dtype, device=device
        )
    elif encoding.kind == protocol.ENCODING_TOPK and encoding.k is not None:
        k = encoding.k
        topk_values = result[protocol.KEY_TOPK_VALUES] = torch.empty((batch, seq_len, k), device=device)
        topk_indices = torch.empty((batch, seq_len, k), dtype=torch.int64, device=device)
        values, indices = tail_probs(out.logits_dtype, ids.numel(), device)[0].topk(k, dim=-1)
        topk_values[:, -1], topk_indices[:, -1] = values, indices
    for b, first, rows in out.logit_slices():
        end = first + rows.shape[0]
        torch.argmax(rows, dim=-1, out=top[b, first:end])
        if first == 0:
            rows, first = rows[1:], 1  # logits row 0 feeds no output row
        if draft is not None:
            torch.index_select(rows, -1, ids, out=draft[b, first - 1 : end - 1])
        if topk_values is not None and topk_indices is not None and encoding.k is not None:
            probs = torch.softmax(rows.index_select(-1, ids).float(), dim=-1)
            values, indices = probs.topk(encoding.k, dim=-1)
            topk_values[b, first - 1 : end - 1], topk_indices[b, first - 1 : end - 1] = values, indices
    if topk_indices is not None:
        result[protocol.KEY_TOPK_INDICES] = topk_indices.to(topk_index_dtype(mapping.draft_vocab_size))
    return top, result


@torch.no_grad()
def encode(
    encoding: Encoding,
    out: ForwardOutputs,
    inputs: GenerateInputs,
    mapping: VocabMapping,
    *,
    alloc: Allocator | None = None,
    on_rows: Callable[[torch.Tensor, int], None] | None = None,
) -> dict[str, torch.Tensor]:
    """The ``/generate`` answer in ``encoding``, keyed in ``protocol.ENCODING_KEYS`` order.

    ``inputs`` and ``mapping`` must be on the logits' device. ``alloc`` supplies the memory of
    the ``probs`` answer (reused blocks); the other encodings are small and allocate.
    ``on_rows``: the ``probs`` answer's progress (:func:`project_into`); unused by the others.
    """
    if encoding == PROBS:
        return project_into(
            out.aux_hidden_states, out, inputs.input_ids, inputs.loss_mask, mapping, alloc=alloc, on_rows=on_rows
        )
    if encoding.kind not in (protocol.ENCODING_LOGITS, protocol.ENCODING_HIDDEN, protocol.ENCODING_TOPK):
        raise ValueError(f"unknown encoding {encoding.name!r}")
    top, result = _slice_pass(out, mapping, encoding)
    result["aux_hidden_states"] = out.aux_hidden_states
    if encoding.kind == protocol.ENCODING_HIDDEN:
        if out.final_hidden is None:
            raise RuntimeError("the 'hidden' encoding needs a forward that captured the LM head's input")
        result[protocol.KEY_FINAL_HIDDEN] = shift_left(out.final_hidden)
    result.update(_masks(top, inputs, mapping))
    return {key: result[key] for key in encoding.keys}


@torch.no_grad()
def in_process(
    target: Target, inputs: GenerateInputs, mapping: VocabMapping, encoding: Encoding = PROBS
) -> dict[str, torch.Tensor]:
    """The answer computed in this process the plain way (``probs``: :func:`reference_projection`).

    This is the co-located computation a served answer must equal: the demo, ``validate`` and
    the tests compare against it.
    """
    inputs, mapping = inputs.to(target.device), mapping.to(target.device)
    out = target.forward(
        inputs.input_ids, inputs.attention_mask, capture_hidden=encoding.kind == "hidden", packing=inputs.packing
    )
    if encoding == PROBS:
        assert out.logits is not None  # an unsliced forward
        return reference_projection(out.aux_hidden_states, out.logits, inputs.input_ids, inputs.loss_mask, mapping)
    return encode(encoding, out, inputs, mapping)


def supervision_equal(batch: Any, reference: Mapping[str, torch.Tensor]) -> bool:
    """Bitwise equality of every supervision tensor of ``batch`` (dtype, shape and values)."""
    for key, expected in reference.items():
        got = getattr(batch, key).cpu()
        if got.dtype != expected.dtype or got.shape != expected.shape or not torch.equal(got, expected.cpu()):
            return False
    return True


def compare_to_reference(batch: Any, expected: Mapping[str, torch.Tensor], encoding: Encoding) -> tuple[bool, str]:
    """Check a decoded batch against the in-process reference as ``encoding`` promises: ``(ok, verdict)``.

    probs/logits: every tensor bit-exact. hidden: ``target_probs`` within :data:`HIDDEN_TOLERANCE`,
    the rest bit-exact. topk:K: the rest bit-exact, rows sum to one, exactly the top K kept.
    """
    got = {key: getattr(batch, key).cpu() for key in expected}
    rest_exact = all(
        got[k].dtype == v.dtype and got[k].shape == v.shape and torch.equal(got[k], v.cpu())
        for k, v in expected.items()
        if k != "target_probs"
    )
    probs, reference = got["target_probs"], expected["target_probs"].cpu()
    if probs.shape != reference.shape or probs.dtype != reference.dtype:
        return False, f"target_probs {probs.dtype} {list(probs.shape)} != {reference.dtype} {list(reference.shape)}"
    if encoding.kind == protocol.ENCODING_HIDDEN:
        deviation = float((probs - reference).abs().max()) if probs.numel() else 0.0
        ok = rest_exact and deviation <= HIDDEN_TOLERANCE
        return ok, f"max-dev={deviation:.2g} (<= {HIDDEN_TOLERANCE:g}: {'yes' if ok else 'NO'})"
    if encoding.kind == protocol.ENCODING_TOPK:
        assert encoding.k is not None
        values, indices = reference.topk(encoding.k, dim=-1)
        kept = torch.zeros_like(reference, dtype=torch.bool).scatter_(-1, indices, True)
        sums_to_one = bool(((probs.sum(-1) - 1).abs() <= 1e-5).all())
        ok = rest_exact and sums_to_one and torch.equal(probs > 0, kept)
        mass = float(values.sum(-1).mean())
        return ok, f"top-{encoding.k} kept mass {mass:.3f} (exactly top-K, sums to 1: {'yes' if ok else 'NO'})"
    ok = rest_exact and torch.equal(probs, reference)
    return ok, f"bit-exact={'yes' if ok else 'NO'}"
