"""The DFlash family's capture: the outputs of a chosen layer set, and optionally the full logits.

The server's forward (:meth:`eagle3_appliance.model.target.Target.forward`) captures the three
aux layers EAGLE-3 needs; :func:`forward_with_layers` runs that same forward with hooks on the
layers DFlash-style requests name as well, for exactly one forward, so one stacked forward can
serve EAGLE-3 and DFlash jobs alike. :func:`encode` turns it into a DFlash answer, computed as
upstream's ``HFDFlashTargetModel.generate_batch`` does: the hooked layers' outputs (output
``[0]`` when a layer returns a tuple) concatenated in the requested order, no shift, and the
model's own logits, untouched, when asked.

A DSpark capture is computed as upstream's ``HFDSparkTargetModel.generate_batch`` does, from
hooks in the same forward: ``-1`` is the input embedding's output, the last layer is the final
norm's output, any other id that layer's output (output ``[0]`` of a tuple); each feature with a
4-D hyper-connection stream ``[B,T,h,H]`` reduced by its mean over the streams, concatenated in
order; and the final norm's output again, alone (``last_hidden_states``). Hooks are keyed by
:func:`hook_points`: a layer's index, :data:`EMBEDDING` (-1) or :data:`FINAL_NORM` (-2).

An EAGLE-1/2 capture (upstream's ``HFEagleTargetModel``: ``lm_head(base_model(...)[0])``) is the
final norm's output, hooked in the same forward, and the forward's own logits, which every causal
LM computes as ``lm_head`` of exactly that output; a model that transforms the head's output
(soft-capping, scaling: :meth:`Target.logit_transform`) is refused, as upstream's logits would
not be the model's.

:func:`check_request` bounds what one request may cost: the same working-memory budget as an
EAGLE-3 ``/generate`` (:attr:`ServingLimits.working_bytes`, at :func:`working_bytes_per_token`),
and an answer no larger than the server's largest EAGLE-3 answer (``max_answer_bytes``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from eagle3_appliance.core.inputs import Allocator, GenerateInputs, Packing
from eagle3_appliance.errors import InvalidRequest
from eagle3_appliance.model.limits import ServingLimits, TargetShape
from eagle3_appliance.model.outputs import ForwardOutputs
from eagle3_appliance.model.target import Target
from eagle3_appliance.model.vlm import vlm_refusal
from eagle3_client.capture import KEY_HIDDEN_STATES, KEY_LAST_HIDDEN_STATES, KEY_LOGITS, Capture

__all__ = [
    "EMBEDDING",
    "FINAL_NORM",
    "answer_bytes_per_token",
    "capture_refusal",
    "check_request",
    "encode",
    "find_final_norm",
    "forward_with_layers",
    "hook_points",
    "lm_head_refusal",
    "lm_head_rows",
    "working_bytes_per_token",
]


# Hook keys beside the decoder layers' indices (DSpark): the input embedding's and the final norm's output.
EMBEDDING = -1
FINAL_NORM = -2
# Where the text stack (the module holding ``layers`` and ``norm``) sits, as upstream's DSpark wrapper looks.
_TEXT_STACKS = (("model",), ("model", "language_model"), ("language_model",), ())


def find_final_norm(model: nn.Module) -> nn.Module | None:
    """The final norm whose output feeds the LM head (``<text stack>.norm``), or None."""
    for names in _TEXT_STACKS:
        obj: Any = model
        for name in names:
            obj = getattr(obj, name, None)
            if obj is None:
                break
        if obj is not None and hasattr(obj, "layers"):
            norm = getattr(obj, "norm", None)
            return norm if isinstance(norm, nn.Module) else None
    return None


def capture_refusal(target: Target, capture: Capture) -> str | None:
    """Why this server's model cannot serve ``capture`` exactly as the co-located wrapper would, or None."""
    if capture.is_eagle3:
        return target.eagle3_refusal
    if capture.is_vlm:
        return vlm_refusal(target, capture)
    if capture.is_eagle:
        if find_final_norm(target.model) is None:
            return "the model's final norm (the text stack's `norm`) was not found"
        transform = target.logit_transform()
        return None if transform is None else f"{transform}: its logits are not lm_head(last hidden state)"
    if not capture.is_dspark:
        return None
    if hasattr(target.model, "get_dspark_target_feature_modules"):
        return "the model chooses its own DSpark feature modules (get_dspark_target_feature_modules), not served here"
    if find_final_norm(target.model) is None:
        return "the model's final norm (the text stack's `norm`) was not found"
    if EMBEDDING in capture.layers and not isinstance(target.model.get_input_embeddings(), nn.Module):
        return "the model has no input embedding module to capture layer -1 from"
    return None


def hook_points(capture: Capture, num_layers: int) -> set[int]:
    """The hook keys a forward needs for ``capture``: its layers (DFlash), or DSpark's feature points."""
    if capture.is_eagle3 or capture.is_vlm:
        return set()
    if capture.is_eagle:
        return {FINAL_NORM}  # the last hidden state
    if not capture.is_dspark:
        return set(capture.layers)
    points = {i for i in capture.layers if 0 <= i < num_layers - 1}
    if EMBEDDING in capture.layers:
        points.add(EMBEDDING)
    points.add(FINAL_NORM)  # the last layer's feature and the last hidden state
    return points


def _hook_module(target: Target, key: int) -> nn.Module:
    if key == EMBEDDING:
        module: nn.Module = target.model.get_input_embeddings()
        return module
    if key == FINAL_NORM:
        norm = find_final_norm(target.model)
        if norm is None:
            raise RuntimeError("the model's final norm was not found")
        return norm
    return target.layers[key]


@contextlib.contextmanager
def _hooks(target: Target, ids: Sequence[int]) -> Iterator[dict[int, torch.Tensor]]:
    """Forward hooks on the module of each key in ``ids``, for one block; the dict fills as the forward runs."""
    captured: dict[int, torch.Tensor] = {}
    handles = []

    def hook_for(layer_id: int) -> Any:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            captured[layer_id] = output[0] if isinstance(output, tuple) else output

        return hook

    try:
        for i in ids:
            handles.append(_hook_module(target, i).register_forward_hook(hook_for(i)))
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
    vision: Mapping[str, torch.Tensor] | None = None,
) -> tuple[ForwardOutputs, dict[int, torch.Tensor]]:
    """The target's forward, plus the outputs of the ``layer_ids`` hook keys (:func:`hook_points`; none:
    exactly ``Target.forward``). ``vision``: a DSpark request's vision tensors, for the model's forward."""
    ids = sorted(set(layer_ids))
    with _hooks(target, ids) as captured:
        out = target.forward(
            input_ids,
            attention_mask,
            capture_hidden=capture_hidden,
            alloc=alloc,
            packing=packing,
            slice_rows=slice_rows,
            vision=vision,
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
    num_layers: int | None = None,
) -> dict[str, torch.Tensor]:
    """A DFlash or DSpark answer for batch ``rows`` of a forward (all of it when None), keyed in
    ``capture.keys`` order. ``num_layers``: the model's depth (a DSpark capture needs it)."""
    rows = rows if rows is not None else slice(None)
    if capture.is_eagle:
        return {KEY_LAST_HIDDEN_STATES: layers[FINAL_NORM][rows], KEY_LOGITS: _logits(out, rows, alloc)}
    if capture.is_dspark:
        if num_layers is None:
            raise ValueError("a DSpark answer needs the model's number of layers")
        return _encode_dspark(capture, layers, rows, num_layers, alloc)
    parts = [layers[i][rows] for i in capture.layers]
    if alloc is None or len(parts) == 1:
        hidden = torch.cat(parts, dim=-1)
    else:
        shape = (*parts[0].shape[:-1], sum(p.shape[-1] for p in parts))
        hidden = torch.cat(parts, dim=-1, out=alloc(shape, parts[0].dtype))
    answer = {KEY_HIDDEN_STATES: hidden}
    if capture.logits:
        answer[KEY_LOGITS] = _logits(out, rows, alloc)
    return answer


def _logits(out: ForwardOutputs, rows: slice, alloc: Allocator | None) -> torch.Tensor:
    """The model's logits of batch ``rows``: its own, or its LM head run over slices into the answer."""
    if out.logits is not None:
        return out.logits[rows]
    start, stop, _ = rows.indices(out.logits_shape[0])
    return out.rows(start, stop).full_logits(alloc)


def _dspark_feature(layer_id: int, layers: dict[int, torch.Tensor], last: int) -> torch.Tensor:
    key = EMBEDDING if layer_id == -1 else FINAL_NORM if layer_id == last else layer_id
    feature = layers[key]
    return feature.mean(dim=2) if feature.ndim == 4 else feature  # hyper-connection streams, as upstream


def _encode_dspark(
    capture: Capture, layers: dict[int, torch.Tensor], rows: slice, num_layers: int, alloc: Allocator | None
) -> dict[str, torch.Tensor]:
    parts = [_dspark_feature(i, layers, num_layers - 1)[rows] for i in capture.layers]
    if alloc is None or len(parts) == 1:
        hidden = torch.cat(parts, dim=-1)
    else:
        shape = (*parts[0].shape[:-1], sum(p.shape[-1] for p in parts))
        hidden = torch.cat(parts, dim=-1, out=alloc(shape, parts[0].dtype))
    return {KEY_HIDDEN_STATES: hidden, KEY_LAST_HIDDEN_STATES: layers[FINAL_NORM][rows]}


def _captured_tensors(capture: Capture) -> int:
    """How many ``[B,T,H]`` tensors the capture keeps alive: its layers (and DSpark's final norm; a VLM
    capture's embedding output and last hidden state; EAGLE-1/2's last hidden state)."""
    if capture.is_vlm:
        return 2
    if capture.is_eagle:
        return 1
    return len(capture.layers) + (1 if capture.is_dspark else 0)


def working_bytes_per_token(shape: TargetShape, capture: Capture, *, sliced: bool = True) -> int:
    """Server memory one token of this capture needs at worst: the decoder's activations, every
    captured layer beyond the three aux ones kept alive and concatenated, and the answer (with
    logits: the whole logits, written slice by slice). ``sliced=False``: an unsliced EAGLE-3
    forward's memory instead of the activations and the logits."""
    if capture.is_vlm:  # the model's own unsliced forward, every hidden state it keeps, and the answer
        kept = (shape.num_layers + 1) * shape.hidden_size * shape.dtype_bytes
        return shape.unsliced_bytes_per_token() + kept + answer_bytes_per_token(shape, capture)
    extra_layers = max(0, _captured_tensors(capture) - 3)
    layers = 2 * extra_layers * shape.hidden_size * shape.dtype_bytes
    if not sliced:
        return shape.unsliced_bytes_per_token() + layers
    return shape.bytes_per_token(draft_vocab=0) + layers + answer_bytes_per_token(shape, capture)


def answer_bytes_per_token(shape: TargetShape, capture: Capture) -> int:
    """Wire bytes of one token of a DFlash answer: ``n x H`` hidden units, and ``V`` logits when asked
    (DSpark: ``(n + 1) x H``, the features and the final norm's output; EAGLE-1/2: ``H + V``)."""
    logits = capture.logits or capture.is_vlm or capture.is_eagle
    width = _captured_tensors(capture) * shape.hidden_size + (shape.vocab_size if logits else 0)
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
        layers = f" of {len(capture.layers)} layers" if capture.takes_layers else ""
        raise InvalidRequest(
            f"a {capture.label} capture{layers} may use at most "
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
