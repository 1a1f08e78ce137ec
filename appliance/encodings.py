"""Supervision encodings, server side: negotiation, the model check for ``hidden``, one encoder each.

:func:`appliance.target.compute_supervision` (``probs``) stays the reference; every other
encoding is computed from the same forward outputs, so that the client's last step
(:mod:`client.encodings`) reproduces ``target_probs``:

* ``logits``: ``shift(logits[..., ids])`` in the model dtype (zero tail row). The client's
  ``softmax(x.float(), -1)`` is the reference's own last op on the same values.
* ``hidden``: ``shift(h)`` where ``h`` is the input of the LM head (captured with a pre-hook
  only for sessions that use it). Valid only when ``logits == linear(h, lm_head.weight)``:
  no bias, no soft-capping or scaling after the head; :func:`hidden_refusal` checks that.
* ``topk:K``: the K largest reference probabilities (float32, *not* renormalised, so their
  sum is the kept mass) and their indices, int16 when the draft vocabulary allows.

``position_mask``, shifted ``input_ids`` and ``loss_mask`` are the reference's in every encoding.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from appliance.errors import ApplianceError, InvalidTensors
from appliance.target import Target, VocabMapping, compute_supervision, shift_left
from client import protocol
from client.encodings import PROBS, Encoding, parse_encoding, topk_index_dtype

__all__ = [
    "HIDDEN_TOLERANCE",
    "EncodingError",
    "ForwardOutputs",
    "capture_lm_head_input",
    "check_mapping",
    "compare_to_reference",
    "choose_encoding",
    "encode_hidden",
    "encode_logits",
    "encode_probs",
    "encode_topk",
    "forward",
    "hidden_refusal",
    "lm_head_rows",
    "offered_encodings",
    "supervise",
    "validate_row_request",
]

# Config attributes that put a transformation between the LM head and the logits (their
# neutral value, where one exists). With any of them "hidden" would give the wrong distribution.
_LOGIT_TRANSFORMS: dict[str, float | None] = {
    "final_logit_softcapping": None,  # Gemma 2/3: tanh soft-capping
    "logit_scale": 1.0,  # Cohere
    "logits_scaling": 1.0,  # Granite (logits are divided by it)
    "output_multiplier_scale": 1.0,
}


# The documented bound on |target_probs - reference| for "hidden" (README, "Supervision
# encodings"). Measured 0 on CPU for float32 and bfloat16; not bitwise by promise, because
# the client's [D,H] GEMM may sum in another order than the server's [V,H] one.
HIDDEN_TOLERANCE = 1e-6


class EncodingError(ApplianceError):
    """An encoding that is unknown, malformed, or cannot be used with this model or mapping."""

    status_code = 422


@dataclass
class ForwardOutputs:
    """One target forward: aux states ``[B,T,3H]``, logits ``[B,T,V]``, and the LM head's input if captured."""

    aux_hidden_states: torch.Tensor
    logits: torch.Tensor
    final_hidden: torch.Tensor | None = None


# -- negotiation --------------------------------------------------------------------------


def offered_encodings(offer: Mapping[str, Any]) -> list[Encoding]:
    """The encodings a ``POST /session`` offer accepts, best first: ``"encoding"`` then ``"encodings"``.

    No ``"encoding"`` key means upstream's probs. Every name must parse (422 otherwise).
    """
    names: list[Any] = [offer.get("encoding", protocol.ENCODING_PROBS)]
    extra = offer.get("encodings", [])
    if not isinstance(extra, list):
        raise EncodingError(f"'encodings' must be a list of encoding names, got {type(extra).__name__}")
    names += extra
    out: list[Encoding] = []
    for name in names:
        try:
            encoding = parse_encoding(name)
        except ValueError as exc:
            raise EncodingError(str(exc)) from None
        if encoding not in out:
            out.append(encoding)
    return out


def choose_encoding(offered: list[Encoding], hidden_refused: str | None) -> tuple[Encoding, str | None]:
    """The first offered encoding this server can send, and why the preferred one was not chosen.

    ``hidden_refused`` is :func:`hidden_refusal` for this model. Raises 422 when none fits.
    """
    reasons: list[str] = []
    for encoding in offered:
        if encoding.kind == protocol.ENCODING_HIDDEN and hidden_refused is not None:
            reasons.append(f"'hidden' is not available for this model: {hidden_refused}")
            continue
        return encoding, ("; ".join(reasons) or None)
    raise EncodingError("; ".join(reasons) or "no encoding offered")


def check_mapping(encoding: Encoding, mapping: VocabMapping) -> None:
    """``topk:K`` needs ``K <= D``: checked when a session's draft vocabulary becomes known."""
    if encoding.k is not None and encoding.k > mapping.draft_vocab_size:
        raise EncodingError(
            f"encoding {encoding.name} keeps more entries than the draft vocabulary has ({mapping.draft_vocab_size}); "
            "use K <= D"
        )


_HIDDEN_REFUSALS: weakref.WeakKeyDictionary[Target, str | None] = weakref.WeakKeyDictionary()


def hidden_refusal(target: Target) -> str | None:
    """Why ``hidden`` cannot reproduce this model's logits, or None when it can (cached per model).

    Config checks give a named reason; a probe forward then checks, bit for bit, that the
    logits are exactly ``linear(lm_head_input, lm_head.weight)``, which also catches
    transformations no config attribute announces. Runs a forward: call it on the model thread.
    """
    if target in _HIDDEN_REFUSALS:
        return _HIDDEN_REFUSALS[target]
    reason = _static_refusal(target)
    if reason is None:
        reason = _probe_refusal(target)
    _HIDDEN_REFUSALS[target] = reason
    return reason


def _static_refusal(target: Target) -> str | None:
    head = target.model.get_output_embeddings()
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        return "the model has no output embedding (LM head) weight"
    if getattr(head, "bias", None) is not None:
        return "the LM head has a bias"
    configs = [target.config, getattr(target.config, "text_config", None)]
    for config in (c for c in configs if c is not None):
        for attr, neutral in _LOGIT_TRANSFORMS.items():
            value = getattr(config, attr, None)
            if value is not None and value != neutral:
                return f"the config sets {attr}={value}, a transformation after the LM head"
    return None


def _probe_refusal(target: Target) -> str | None:
    ids = (torch.arange(8, device=target.device) % target.vocab_size).unsqueeze(0)
    out = forward(target, ids, torch.ones_like(ids), capture_hidden=True)
    weight = target.model.get_output_embeddings().weight
    assert out.final_hidden is not None
    recomputed = torch.nn.functional.linear(out.final_hidden, weight).to(out.logits.dtype)
    if recomputed.shape != out.logits.shape or not torch.equal(recomputed, out.logits):
        return "the logits are not exactly linear(LM-head input, LM-head weight) (a transformation after the head)"
    return None


def lm_head_rows(target: Target, selected_token_ids: torch.Tensor) -> torch.Tensor:
    """``lm_head.weight[selected_token_ids]`` ``[D,H]`` on the CPU, for a ``hidden`` client."""
    weight = target.model.get_output_embeddings().weight
    return weight.index_select(0, selected_token_ids.to(weight.device)).detach().to("cpu").contiguous()


def validate_row_request(tensors: Mapping[str, torch.Tensor | None], *, logits_size: int) -> torch.Tensor:
    """The ``selected_token_ids`` of an ``/lm_head_rows`` body: int, 1-D, non-empty, in ``[0, V)``."""
    ids = tensors.get("selected_token_ids")
    extra = sorted(set(tensors) - {"selected_token_ids"})
    if ids is None or extra:
        raise InvalidTensors(f"expected exactly the key 'selected_token_ids', got {sorted(tensors)}")
    if ids.dtype not in (torch.int64, torch.int32, torch.int16) or ids.ndim != 1 or ids.numel() == 0:
        raise InvalidTensors(
            f"selected_token_ids must be a non-empty 1-D integer tensor, got {ids.dtype} {list(ids.shape)}"
        )
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= logits_size:
        raise InvalidTensors(f"selected_token_ids must lie in [0, {logits_size}), got values in [{low}, {high}]")
    return ids.long()


# -- the forward and the encoders ---------------------------------------------------------


@contextlib.contextmanager
def capture_lm_head_input(target: Target) -> Iterator[dict[str, torch.Tensor]]:
    """A pre-hook on the LM head for the duration of one forward: ``slot["h"]`` is its input.

    The LM head's input is exactly what ``hidden`` needs (after the final norm and any
    scaling the model applies before the head), and a hook costs nothing when absent.
    """
    slot: dict[str, torch.Tensor] = {}

    def hook(_module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        slot["h"] = args[0]

    handle = target.model.get_output_embeddings().register_forward_pre_hook(hook)
    try:
        yield slot
    finally:
        handle.remove()


def forward(
    target: Target, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, capture_hidden: bool = False
) -> ForwardOutputs:
    """:meth:`Target.forward`, plus the LM head's input when ``capture_hidden``."""
    if not capture_hidden:
        aux, logits = target.forward(input_ids, attention_mask)
        return ForwardOutputs(aux, logits)
    with capture_lm_head_input(target) as slot:
        aux, logits = target.forward(input_ids, attention_mask)
    hidden = slot.get("h")
    if hidden is None or hidden.shape[:-1] != logits.shape[:-1]:
        raise RuntimeError("the LM head's input was not captured for every position")
    return ForwardOutputs(aux, logits, hidden)


def _masks(out: ForwardOutputs, input_ids: torch.Tensor, loss_mask: torch.Tensor, mapping: VocabMapping) -> dict:
    """``position_mask`` and the shifted ids/loss mask, computed as the reference does."""
    token_mask = mapping.selected_token_mask.to(out.logits.device)
    shifted_loss_mask = shift_left(loss_mask)
    shifted_top = shift_left(out.logits.argmax(dim=-1))
    position_mask = (token_mask[shifted_top] & shifted_loss_mask.bool()).unsqueeze(-1)
    return {"position_mask": position_mask, "input_ids": shift_left(input_ids), "loss_mask": shifted_loss_mask}


def encode_probs(out: ForwardOutputs, input_ids: torch.Tensor, loss_mask: torch.Tensor, mapping: VocabMapping) -> dict:
    """Upstream's answer: the reference itself."""
    return compute_supervision(out.aux_hidden_states, out.logits, input_ids, loss_mask, mapping)


def encode_logits(out: ForwardOutputs, input_ids: torch.Tensor, loss_mask: torch.Tensor, mapping: VocabMapping) -> dict:
    """Shifted draft-vocab logits in the model dtype; the zero tail row softmaxes to the reference tail."""
    draft = out.logits.index_select(-1, mapping.selected_token_ids.to(out.logits.device))
    masks = _masks(out, input_ids, loss_mask, mapping)
    return {
        "aux_hidden_states": out.aux_hidden_states,
        protocol.KEY_DRAFT_LOGITS: shift_left(draft),
        **masks,
    }


def encode_hidden(out: ForwardOutputs, input_ids: torch.Tensor, loss_mask: torch.Tensor, mapping: VocabMapping) -> dict:
    """Shifted LM-head input ``[B,T,H]``; a zero tail row projects to zero logits (the reference tail)."""
    if out.final_hidden is None:
        raise RuntimeError("the 'hidden' encoding needs a forward that captured the LM head's input")
    masks = _masks(out, input_ids, loss_mask, mapping)
    return {
        "aux_hidden_states": out.aux_hidden_states,
        protocol.KEY_FINAL_HIDDEN: shift_left(out.final_hidden),
        **masks,
    }


def encode_topk(
    out: ForwardOutputs, input_ids: torch.Tensor, loss_mask: torch.Tensor, mapping: VocabMapping, k: int
) -> dict:
    """The K largest reference probabilities (float32, as computed, not renormalised) and their indices."""
    reference = encode_probs(out, input_ids, loss_mask, mapping)
    values, indices = reference["target_probs"].topk(k, dim=-1)
    return {
        "aux_hidden_states": reference["aux_hidden_states"],
        protocol.KEY_TOPK_VALUES: values,
        protocol.KEY_TOPK_INDICES: indices.to(topk_index_dtype(mapping.draft_vocab_size)),
        "position_mask": reference["position_mask"],
        "input_ids": reference["input_ids"],
        "loss_mask": reference["loss_mask"],
    }


@torch.no_grad()
def supervise(
    target: Target,
    encoding: Encoding,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    loss_mask: torch.Tensor,
    mapping: VocabMapping,
) -> dict[str, torch.Tensor]:
    """The ``/generate`` answer in ``encoding``, keyed in ``protocol.ENCODING_KEYS`` order."""
    if encoding == PROBS:
        return target.supervise(input_ids, attention_mask, loss_mask, mapping)
    check_mapping(encoding, mapping)
    dev = target.device
    input_ids, attention_mask, loss_mask = (t.to(dev) for t in (input_ids, attention_mask, loss_mask))
    out = forward(target, input_ids, attention_mask, capture_hidden=encoding.kind == protocol.ENCODING_HIDDEN)
    if encoding.kind == protocol.ENCODING_LOGITS:
        result = encode_logits(out, input_ids, loss_mask, mapping)
    elif encoding.kind == protocol.ENCODING_HIDDEN:
        result = encode_hidden(out, input_ids, loss_mask, mapping)
    else:
        assert encoding.k is not None
        result = encode_topk(out, input_ids, loss_mask, mapping, encoding.k)
    return {key: result[key] for key in encoding.keys}


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
