"""Check one ``/generate`` answer against the protocol, so that a wrong answer counts as a failure.

A load test that only counts HTTP 200s would report a server that returns garbage quickly
as a fast server. Everything here can be checked without the model: keys and their order,
dtypes, shapes (from ``/model_info`` and the draft vocabulary this user set), that the
echoed ``input_ids``/``loss_mask`` are the request's shifted left, that probability rows
are non-negative and sum to one, and that the position mask is off where the shifted loss
mask is.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from eagle3_client.capture import (
    EAGLE3,
    KEY_HIDDEN_STATES,
    KEY_INPUTS_EMBEDS,
    KEY_LAST_HIDDEN_STATES,
    KEY_LOGITS,
    Capture,
)
from eagle3_client.protocol import SUPERVISION_KEYS

__all__ = [
    "AUX_DTYPES",
    "DEFAULT_ENCODING",
    "Expected",
    "SupervisionError",
    "check_streamed",
    "check_supervision",
    "payload_bytes",
    "shift_left",
]

# The model dtype is not in /model_info, so any floating dtype a target can run in is accepted.
AUX_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DEFAULT_ENCODING = "probs"  # upstream's: softmax over the draft vocabulary


class SupervisionError(ValueError):
    """The answer decoded but is not correct supervision for the request."""


@dataclass(frozen=True)
class Expected:
    """What this user knows the answer must look like."""

    hidden_size: int
    draft_vocab: int
    encoding: str = DEFAULT_ENCODING
    prob_tolerance: float = 1e-4
    capture: Capture = EAGLE3
    vocab_size: int = 0  # the logits' width, for a capture with logits


def shift_left(x: torch.Tensor) -> torch.Tensor:
    """The protocol's next-token shift: drop the first column, append a zero column."""
    return torch.cat((x[:, 1:], torch.zeros_like(x[:, :1])), dim=1)


def payload_bytes(tensors: Mapping[str, torch.Tensor | None]) -> int:
    """Tensor data bytes of an answer, without the wire headers."""
    return sum(t.numel() * t.element_size() for t in tensors.values() if t is not None)


def _get(tensors: Mapping[str, torch.Tensor | None], key: str) -> torch.Tensor:
    tensor = tensors.get(key)
    if tensor is None:
        raise SupervisionError(f"answer has no {key}")
    return tensor


def _shape(key: str, tensor: torch.Tensor, expected: list[int]) -> None:
    if list(tensor.shape) != expected:
        raise SupervisionError(f"{key} has shape {list(tensor.shape)}, expected {expected}")


def _dtype(key: str, tensor: torch.Tensor, allowed: tuple[torch.dtype, ...]) -> None:
    if tensor.dtype not in allowed:
        raise SupervisionError(f"{key} has dtype {tensor.dtype}, expected one of {[str(d) for d in allowed]}")


def check_supervision(
    tensors: Mapping[str, torch.Tensor | None], request: Mapping[str, torch.Tensor], expected: Expected
) -> None:
    """Raise :class:`SupervisionError` naming the first thing that is wrong with ``tensors``.

    With an encoding other than ``probs`` only the encoding-independent tensors are checked
    (the other encodings carry different keys in place of ``target_probs``).
    """
    if not expected.capture.is_eagle3:
        _check_capture(tensors, request, expected)
        return
    probs_encoding = expected.encoding == DEFAULT_ENCODING
    keys = list(tensors)
    if probs_encoding and keys != list(SUPERVISION_KEYS):
        raise SupervisionError(f"answer has keys {keys}, expected exactly {list(SUPERVISION_KEYS)} in that order")
    input_ids = request["input_ids"]
    batch, seq_len = input_ids.shape

    aux = _get(tensors, "aux_hidden_states")
    _dtype("aux_hidden_states", aux, AUX_DTYPES)
    _shape("aux_hidden_states", aux, [batch, seq_len, 3 * expected.hidden_size])
    if not all(bool(torch.isfinite(sample).all()) for sample in aux):
        raise SupervisionError("aux_hidden_states holds NaN or infinite values")

    echoed_ids = _get(tensors, "input_ids")
    _shape("input_ids", echoed_ids, [batch, seq_len])
    if echoed_ids.is_floating_point() or not torch.equal(echoed_ids.long(), shift_left(input_ids).long()):
        raise SupervisionError("input_ids is not the request's input_ids shifted left by one")

    loss_mask = _get(tensors, "loss_mask")
    _shape("loss_mask", loss_mask, [batch, seq_len])
    shifted_loss = shift_left(request["loss_mask"]).long()
    if loss_mask.is_floating_point() or not torch.equal(loss_mask.long(), shifted_loss):
        raise SupervisionError("loss_mask is not the request's loss_mask shifted left by one")

    position_mask = _get(tensors, "position_mask")
    _dtype("position_mask", position_mask, (torch.bool,))
    _shape("position_mask", position_mask, [batch, seq_len, 1])
    if bool((position_mask.squeeze(-1) & (shifted_loss == 0)).any()):
        raise SupervisionError("position_mask is set where the shifted loss mask is 0")

    if probs_encoding:
        _check_probs(_get(tensors, "target_probs"), batch, seq_len, expected)


def _check_capture(
    tensors: Mapping[str, torch.Tensor | None], request: Mapping[str, torch.Tensor], expected: Expected
) -> None:
    """Another family's answer, unshifted, keys in the capture's order: DFlash's layer outputs
    ``[B,T,n*H]`` (and the logits ``[B,T,V]`` if asked); DSpark's as well as the final norm's
    output ``[B,T,H]``; ViSpec's and MSD's input embeddings and last hidden state ``[B,T,H]`` and
    the logits ``[B,T,V]``; EAGLE-1/2's last hidden state ``[B,T,H]`` and its logits ``[B,T,V]``."""
    capture = expected.capture
    if list(tensors) != list(capture.keys):
        raise SupervisionError(f"answer has keys {list(tensors)}, expected exactly {list(capture.keys)}")
    batch, seq_len = request["input_ids"].shape
    hidden_width = expected.hidden_size if capture.is_vlm else len(capture.layers) * expected.hidden_size
    widths = {KEY_HIDDEN_STATES: hidden_width, KEY_LOGITS: expected.vocab_size}
    widths |= {KEY_LAST_HIDDEN_STATES: expected.hidden_size, KEY_INPUTS_EMBEDS: expected.hidden_size}
    for key in capture.keys:
        tensor = _get(tensors, key)
        _dtype(key, tensor, AUX_DTYPES)
        _shape(key, tensor, [batch, seq_len, widths[key]])
        if key != KEY_LOGITS and not bool(torch.isfinite(tensor).all()):
            raise SupervisionError(f"{key} holds NaN or infinite values")


def _check_probs(probs: torch.Tensor, batch: int, seq_len: int, expected: Expected) -> None:
    _dtype("target_probs", probs, (torch.float32,))
    _shape("target_probs", probs, [batch, seq_len, expected.draft_vocab])
    # One sample at a time: a [T,D] temporary rather than one the size of the whole answer.
    for sample in probs:
        if not bool(torch.isfinite(sample).all()):
            raise SupervisionError("target_probs holds NaN or infinite values")
        low = float(sample.min())
        if low < 0:
            raise SupervisionError(f"target_probs has a negative probability ({low:.3g})")
        # float32 sums are far more exact than the tolerance (torch sums pairwise).
        error = float((sample.sum(dim=-1) - 1.0).abs().max())
        if error > expected.prob_tolerance:
            raise SupervisionError(
                f"target_probs rows do not sum to 1: largest deviation {error:.3g} > {expected.prob_tolerance:g}"
            )


def check_streamed(tensors: dict[str, torch.Tensor | None], expected: Expected) -> None:
    """A stream batch's EAGLE-3 supervision (probs), checked without its request, which a consumer never sees.

    The batch carries the shifted ``input_ids`` and ``loss_mask`` itself: the shapes agree with
    them, no position-mask bit is set where the loss mask is 0, probability rows sum to 1.
    """
    ids = _get(tensors, "input_ids")
    batch, seq_len = ids.shape
    aux = _get(tensors, "aux_hidden_states")
    _dtype("aux_hidden_states", aux, AUX_DTYPES)
    _shape("aux_hidden_states", aux, [batch, seq_len, 3 * expected.hidden_size])
    if not bool(torch.isfinite(aux).all()):
        raise SupervisionError("aux_hidden_states holds NaN or infinite values")
    loss_mask = _get(tensors, "loss_mask")
    _shape("loss_mask", loss_mask, [batch, seq_len])
    position_mask = _get(tensors, "position_mask")
    _dtype("position_mask", position_mask, (torch.bool,))
    _shape("position_mask", position_mask, [batch, seq_len, 1])
    if loss_mask.is_floating_point() or bool((position_mask.squeeze(-1) & (loss_mask == 0)).any()):
        raise SupervisionError("position_mask is set where the loss mask is 0")
    _check_probs(_get(tensors, "target_probs"), batch, seq_len, expected)
