"""The DFlash family's capture: the outputs of a chosen layer set, and optionally the full logits.

The server's forward (:meth:`eagle3_appliance.model.target.Target.forward`) captures the three
aux layers EAGLE-3 needs; :func:`forward_with_layers` runs that same forward with hooks on the
layers DFlash-style requests name as well, for exactly one forward, so one stacked forward can
serve EAGLE-3 and DFlash jobs alike. :func:`encode` turns it into a DFlash answer, computed as
upstream's ``HFDFlashTargetModel.generate_batch`` does: the hooked layers' outputs (output
``[0]`` when a layer returns a tuple) concatenated in the requested order, no shift, and the
model's own logits, untouched, when asked.

:func:`check_request` bounds what one request may cost: the same working-memory budget as an
EAGLE-3 ``/generate`` (:attr:`ServingLimits.working_bytes`, at :func:`working_bytes_per_token`),
and an answer no larger than the server's largest EAGLE-3 answer (``max_answer_bytes``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from eagle3_appliance.core.inputs import Allocator, GenerateInputs, Packing
from eagle3_appliance.errors import InvalidRequest
from eagle3_appliance.model.limits import ServingLimits, TargetShape
from eagle3_appliance.model.outputs import ForwardOutputs
from eagle3_appliance.model.target import Target
from eagle3_client.capture import KEY_HIDDEN_STATES, KEY_LOGITS, Capture

__all__ = [
    "answer_bytes_per_token",
    "check_request",
    "encode",
    "forward_with_layers",
    "lm_head_refusal",
    "lm_head_rows",
    "working_bytes_per_token",
]


@contextlib.contextmanager
def _hooks(layers: Sequence[nn.Module], ids: Sequence[int]) -> Iterator[dict[int, torch.Tensor]]:
    """Forward hooks on ``layers[i]`` for each ``i`` in ``ids``, for one block; the dict fills as the forward runs."""
    captured: dict[int, torch.Tensor] = {}
    handles = []

    def hook_for(layer_id: int) -> Any:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            captured[layer_id] = output[0] if isinstance(output, tuple) else output

        return hook

    try:
        for i in ids:
            handles.append(layers[i].register_forward_hook(hook_for(i)))
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def forward_with_layers(
    target: Target,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    layer_ids: Collection[int],
    *,
    capture_hidden: bool = False,
    alloc: Allocator | None = None,
    packing: Packing | None = None,
    slice_rows: int | None = None,
) -> tuple[ForwardOutputs, dict[int, torch.Tensor]]:
    """The target's forward, plus the outputs of ``layer_ids`` (none: exactly ``Target.forward``)."""
    ids = sorted(set(layer_ids))
    with _hooks(target.layers, ids) as captured:
        out = target.forward(
            input_ids,
            attention_mask,
            capture_hidden=capture_hidden,
            alloc=alloc,
            packing=packing,
            slice_rows=slice_rows,
        )
    missing = [i for i in ids if i not in captured]
    if missing:
        raise RuntimeError(f"the forward did not run decoder layers {missing}")
    # With a device map the layers may sit on other devices: gathered where the logits are.
    return out, {i: t.to(out.device) for i, t in captured.items()}


@torch.no_grad()
def encode(
    capture: Capture,
    out: ForwardOutputs,
    layers: dict[int, torch.Tensor],
    rows: slice | None = None,
    *,
    alloc: Allocator | None = None,
) -> dict[str, torch.Tensor]:
    """A DFlash answer for batch ``rows`` of a forward (all of it when None), keyed in ``capture.keys`` order."""
    rows = rows if rows is not None else slice(None)
    parts = [layers[i][rows] for i in capture.layers]
    if alloc is None or len(parts) == 1:
        hidden = torch.cat(parts, dim=-1)
    else:
        shape = (*parts[0].shape[:-1], sum(p.shape[-1] for p in parts))
        hidden = torch.cat(parts, dim=-1, out=alloc(shape, parts[0].dtype))
    answer = {KEY_HIDDEN_STATES: hidden}
    if capture.logits:
        if out.logits is not None:
            answer[KEY_LOGITS] = out.logits[rows]
        else:  # the LM head over slices of the sequence, written into the answer
            start, stop, _ = rows.indices(out.logits_shape[0])
            answer[KEY_LOGITS] = out.rows(start, stop).full_logits(alloc)
    return answer


def working_bytes_per_token(shape: TargetShape, capture: Capture, *, sliced: bool = True) -> int:
    """Server memory one token of this capture needs at worst: the decoder's activations, every
    captured layer beyond the three aux ones kept alive and concatenated, and the answer (with
    logits: the whole logits, written slice by slice). ``sliced=False``: an unsliced EAGLE-3
    forward's memory instead of the activations and the logits."""
    extra_layers = max(0, len(capture.layers) - 3)
    layers = 2 * extra_layers * shape.hidden_size * shape.dtype_bytes
    if not sliced:
        return shape.unsliced_bytes_per_token() + layers
    return shape.bytes_per_token(draft_vocab=0) + layers + answer_bytes_per_token(shape, capture)


def answer_bytes_per_token(shape: TargetShape, capture: Capture) -> int:
    """Wire bytes of one token of a DFlash answer: ``n x H`` hidden units, and ``V`` logits when asked."""
    width = len(capture.layers) * shape.hidden_size + (shape.vocab_size if capture.logits else 0)
    return width * shape.dtype_bytes


def check_request(capture: Capture, inputs: GenerateInputs, shape: TargetShape, limits: ServingLimits) -> None:
    """422 naming the limit when this request's memory or answer would pass the server's."""
    if capture.is_eagle3:
        return
    tokens = inputs.tokens
    per_token = working_bytes_per_token(shape, capture, sliced=limits.slice_rows is not None)
    if limits.working_bytes is None:
        most = limits.max_batch_tokens * shape.bytes_per_token() // per_token
    else:
        most = limits.working_bytes // per_token
    if tokens > most:
        raise InvalidRequest(
            f"a {capture.label} capture of {len(capture.layers)} layers may use at most "
            f"{most} tokens per request on this server ({per_token:,} B a token); got {tokens}"
        )
    answer = tokens * answer_bytes_per_token(shape, capture)
    if answer > limits.max_answer_bytes:
        raise InvalidRequest(
            f"the {capture.label} answer of {tokens} tokens would be {answer:,} bytes, above this server's "
            f"largest answer of {limits.max_answer_bytes:,} bytes; send fewer tokens per request"
        )


def lm_head_refusal(target: Target) -> str | None:
    """Why the LM head cannot be sent as rows of one weight (the DFlash draft reuses it), or None."""
    if target.gathered_lm_head is not None:
        return None
    if target.lockstep is not None:
        return f"the LM head is sharded over the ranks of a tensor-parallel target ({target.mode}) and was not gathered"
    head = target.lm_head
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        return "the model has no output embedding (LM head) weight"
    if getattr(head, "bias", None) is not None:
        return "the LM head has a bias, which /lm_head_rows does not send"
    return None


def lm_head_rows(target: Target, ids: torch.Tensor) -> torch.Tensor:
    """``lm_head.weight[ids]`` ``[n,H]`` on the CPU; a tensor-parallel target's from its gathered copy."""
    if target.gathered_lm_head is not None:
        return target.gathered_lm_head.index_select(0, ids).contiguous()
    return target.lm_head_rows(ids)
