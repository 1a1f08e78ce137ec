"""The first step of every request: decode the body and check it, before any of it reaches the model.

Every check raises an :mod:`eagle3_appliance.errors` exception with a message that names the
offending key and value. Token ids are range-checked here because an out-of-range index
on a GPU is a device-side assert that kills the CUDA context for every later request.

Every size a client controls is bounded here, before anything is allocated from it: a body
by ``--max-body-bytes`` (Sanic refuses it before it is read) and :data:`MAX_BODY_ENTRIES`
(the decoder), a batch by the server's token limits, and a draft vocabulary ``D`` by the
model's logits (each id at most once), so that every answer is at most
``max_batch_tokens x logits`` probabilities and ``/lm_head_rows`` at most the whole LM head.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import Any, TypeVar

import orjson
import torch

from eagle3_appliance.core.inputs import GenerateInputs, Packing, VocabMapping
from eagle3_appliance.errors import ApplianceError, InvalidRequest, InvalidTensors, MalformedBody
from eagle3_appliance.model.vlm import VisionRules
from eagle3_appliance.serving.vision_inputs import validate_vision
from eagle3_client import wire
from eagle3_client.capture import EAGLE3, Capture
from eagle3_client.protocol import VOCAB_MAPPING_KEYS, GenerateRequest

__all__ = [
    "MAX_BODY_ENTRIES",
    "decode_body",
    "json_body",
    "json_object",
    "validate_generate",
    "validate_packing",
    "validate_row_request",
    "validate_vocab_mapping",
]

# Entries a wire body may have: ours have at most six keys (a VLM request: three and at most
# MAX_VISION_INPUTS vision tensors); more is not a request (and
# each tiny entry would cost a Python object, a hostile body holding millions of them).
MAX_BODY_ENTRIES = 16

_INTEGER = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
# Masks hold 0/1; recipes build them as integers or bool, some as floats: all are accepted.
_MASK = (*_INTEGER, torch.bool, torch.float32, torch.float16, torch.bfloat16)


def json_object(body: bytes | None) -> dict[str, Any]:
    """A JSON object body (an empty body is ``{}``); 400 for anything else."""
    if not body:
        return {}
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise MalformedBody("body is not valid JSON") from None
    if not isinstance(parsed, dict):
        raise MalformedBody(f"expected a JSON object, got {type(parsed).__name__}")
    return parsed


T = TypeVar("T")


def json_body(body: bytes | None, parse: Callable[[Any], T], *, error: type[ApplianceError] = InvalidRequest) -> T:
    """A JSON body read by one of the protocol's schemas (``Schema.from_json``); ``error`` names what is wrong."""
    try:
        return parse(json_object(body))
    except ValueError as exc:
        raise error(str(exc)) from None


def decode_body(body: bytes) -> dict[str, torch.Tensor | None]:
    """A wire-format tensor dictionary; 400 when the body is empty or malformed."""
    if not body:
        raise MalformedBody("empty body; expected a wire-format tensor dictionary")
    try:
        return wire.decode(body, max_entries=MAX_BODY_ENTRIES)
    except wire.WireFormatError as exc:
        raise MalformedBody(f"malformed wire body: {exc}") from None


def _require(tensors: dict[str, torch.Tensor | None], keys: tuple[str, ...]) -> list[torch.Tensor]:
    missing = [k for k in keys if tensors.get(k) is None]
    if missing:
        raise InvalidTensors(f"missing keys {missing}; expected {list(keys)}, got {sorted(tensors)}")
    extra = sorted(set(tensors) - set(keys))
    if extra:
        raise InvalidTensors(f"unexpected keys {extra}; expected {list(keys)}")
    return [tensors[k] for k in keys]  # type: ignore[misc]


def _check_dtype(key: str, tensor: torch.Tensor, allowed: tuple[torch.dtype, ...]) -> None:
    if tensor.dtype not in allowed:
        names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
        raise InvalidTensors(f"{key} has dtype {str(tensor.dtype).removeprefix('torch.')}; expected one of {names}")


def _check_binary(key: str, tensor: torch.Tensor) -> None:
    if tensor.numel() and tensor.dtype != torch.bool and not bool(((tensor == 0) | (tensor == 1)).all()):
        low, high = tensor.min().item(), tensor.max().item()
        raise InvalidTensors(f"{key} must hold only 0 and 1, got values in [{low:g}, {high:g}]")


def validate_generate(
    tensors: dict[str, torch.Tensor | None],
    *,
    vocab_size: int,
    max_seq_len: int,
    max_batch_tokens: int,
    granted: Collection[str] = (),
    max_packed_rows: int | None = None,
    max_mask_bytes: int | None = None,
    capture: Capture = EAGLE3,
    vision_rules: VisionRules | None = None,
) -> GenerateInputs:
    """``(input_ids, attention_mask, loss_mask)``, each ``[B,T]``, ids in ``[0, vocab_size)``; packing if sent.

    ``granted``: the capabilities of the request's session; a body that needs another is
    refused. A packed body (:data:`eagle3_client.protocol.PACKING_KEYS`) is checked by
    :func:`validate_packing`, with ``max_packed_rows`` (FlashAttention: 1) and
    ``max_mask_bytes`` (the ``[B,1,T,T]`` mask's float32 bytes) as its extra bounds. Under a
    ViSpec, MSD or DSpark ``capture`` the other keys are vision tensors, checked by ``vision_rules``
    (:mod:`eagle3_appliance.serving.vision_inputs`; None: the server takes none, a DSpark session on
    a text-only model); under any other capture they are refused.
    """
    try:
        request = GenerateRequest.from_keys([k for k, v in tensors.items() if v is not None], capture)
    except ValueError as exc:
        raise InvalidTensors(str(exc)) from None
    extra = sorted(set(tensors) - set(request.keys))  # a key sent as None is no key of the request either
    if extra:
        raise InvalidTensors(f"unexpected keys {extra}; expected {list(request.keys)}")
    missing = sorted(request.capabilities - set(granted))
    if missing:
        raise InvalidRequest(
            f"this request carries {missing} fields, which its session was not granted: register with "
            f"POST /session offering capabilities {missing} (an upstream client never sends them)"
        )
    input_ids, attention_mask, loss_mask = (tensors[k] for k in request.keys[:3])
    assert input_ids is not None and attention_mask is not None and loss_mask is not None
    _check_dtype("input_ids", input_ids, _INTEGER)
    _check_dtype("attention_mask", attention_mask, _MASK)
    _check_dtype("loss_mask", loss_mask, _MASK)
    if input_ids.ndim != 2:
        raise InvalidTensors(f"input_ids must be [batch, seq_len], got shape {list(input_ids.shape)}")
    for key, t in (("attention_mask", attention_mask), ("loss_mask", loss_mask)):
        if t.shape != input_ids.shape:
            raise InvalidTensors(f"{key} has shape {list(t.shape)}; input_ids has {list(input_ids.shape)}")
    batch, seq_len = input_ids.shape
    if batch == 0 or seq_len == 0:
        raise InvalidTensors(f"empty batch: input_ids has shape {[batch, seq_len]}")
    if seq_len > max_seq_len:
        raise InvalidTensors(f"sequence length {seq_len} exceeds this server's maximum of {max_seq_len}")
    if batch * seq_len > max_batch_tokens:
        raise InvalidTensors(f"{batch * seq_len} tokens exceed this server's maximum of {max_batch_tokens} per request")
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or high >= vocab_size:
        raise InvalidTensors(f"input_ids must lie in [0, {vocab_size}), got values in [{low}, {high}]")
    _check_binary("attention_mask", attention_mask)
    _check_binary("loss_mask", loss_mask)
    packing = None
    if request.packed:
        packing = validate_packing(
            tensors, input_ids.shape, max_packed_rows=max_packed_rows, max_mask_bytes=max_mask_bytes
        )
    vision: dict[str, torch.Tensor] = {}
    if request.vision:
        if vision_rules is None:
            raise InvalidTensors(f"unexpected keys {list(request.vision)}: this server takes no vision inputs")
        vision = validate_vision(tensors, request.vision, vision_rules, input_ids)
    return GenerateInputs(input_ids, attention_mask, loss_mask, packing, vision)


def validate_packing(
    tensors: Mapping[str, torch.Tensor | None],
    shape: torch.Size,
    *,
    max_packed_rows: int | None = None,
    max_mask_bytes: int | None = None,
) -> Packing:
    """The packing of a ``[B,T]`` batch (``shape``): integer tensors the forward can trust.

    ``position_ids`` and ``doc_remaining`` are ``[B,T]`` in ``[0, T)``; ``seq_lens`` is
    ``[B, max_docs]`` with ``1 <= max_docs <= T``, every length in ``[0, T]``, each row summing to ``T``
    (what ``build_block_causal_additive_mask`` insists on too).
    """
    batch, seq_len = int(shape[0]), int(shape[1])
    position_ids, seq_lens, doc_remaining = (tensors[k] for k in ("position_ids", "seq_lens", "doc_remaining"))
    assert position_ids is not None and seq_lens is not None and doc_remaining is not None
    for key, t in (("position_ids", position_ids), ("seq_lens", seq_lens), ("doc_remaining", doc_remaining)):
        _check_dtype(key, t, _INTEGER)
    for key, t in (("position_ids", position_ids), ("doc_remaining", doc_remaining)):
        if t.shape != shape:
            raise InvalidTensors(f"{key} has shape {list(t.shape)}; input_ids has {[batch, seq_len]}")
        low, high = int(t.min()), int(t.max())
        if low < 0 or high >= seq_len:
            raise InvalidTensors(f"{key} must lie in [0, {seq_len}) (the row length), got values in [{low}, {high}]")
    if seq_lens.ndim != 2 or seq_lens.shape[0] != batch or seq_lens.shape[1] == 0:
        raise InvalidTensors(f"seq_lens must be [batch={batch}, max_docs >= 1], got shape {list(seq_lens.shape)}")
    if seq_lens.shape[1] > seq_len:
        raise InvalidTensors(f"seq_lens names {seq_lens.shape[1]} documents per row, more than the {seq_len} tokens")
    # Each length on its own before any sum: int64 sums wrap, so lengths such as
    # [2^63 - 1, 2^63 - 1, T + 2] would otherwise add up to T.
    low, high = int(seq_lens.min()), int(seq_lens.max())
    if low < 0:
        raise InvalidTensors(f"seq_lens must not be negative, got a length of {low}")
    if high > seq_len:
        raise InvalidTensors(f"seq_lens must lie in [0, {seq_len}] (the row length), got a length of {high}")
    sums = seq_lens.long().sum(dim=1)  # at most max_docs * T <= T^2: no wrap
    if not bool((sums == seq_len).all()):
        bad = int((sums != seq_len).nonzero()[0, 0])
        raise InvalidTensors(
            f"every row of seq_lens must sum to the row length {seq_len} (pad folded into the last document); "
            f"row {bad} sums to {int(sums[bad])}"
        )
    if max_packed_rows is not None and batch > max_packed_rows:
        raise InvalidTensors(
            f"a packed batch may have at most {max_packed_rows} row(s) on this server (a FlashAttention target "
            f"finds documents from position_ids one row at a time), got input_ids with {batch} rows"
        )
    mask_bytes = batch * seq_len * seq_len * 4
    if max_mask_bytes is not None and mask_bytes > max_mask_bytes:
        raise InvalidTensors(
            f"a packed batch of {batch} rows of {seq_len} tokens needs a {mask_bytes:,} B attention mask, more than "
            f"this server's maximum of {max_mask_bytes:,} B; send fewer or shorter rows"
        )
    return Packing(position_ids.long(), seq_lens.long(), doc_remaining.long())


def _check_draft_ids(ids: torch.Tensor, logits_size: int) -> None:
    """A draft vocabulary: at most ``logits_size`` ids, each in ``[0, logits_size)`` and listed once.

    This is what bounds every answer's ``D`` (and ``/lm_head_rows``) by the model itself.
    """
    if ids.numel() > logits_size:
        raise InvalidTensors(
            f"selected_token_ids has {ids.numel()} ids; this model has {logits_size} logits, "
            f"so at most {logits_size} (each id once)"
        )
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= logits_size:
        raise InvalidTensors(f"selected_token_ids must lie in [0, {logits_size}), got values in [{low}, {high}]")
    values, counts = torch.unique(ids, return_counts=True)
    repeated = values[counts > 1]
    if repeated.numel():
        raise InvalidTensors(
            f"selected_token_ids lists {repeated.numel()} id(s) more than once (first: {int(repeated[0])}); "
            "each id may appear once"
        )


def validate_vocab_mapping(tensors: dict[str, torch.Tensor | None], *, logits_size: int) -> VocabMapping:
    """A :class:`VocabMapping`: at most ``V`` distinct int64 ids in ``[0, V)`` and a bool mask of length ``V``."""
    ids, mask = _require(tensors, VOCAB_MAPPING_KEYS)
    _check_dtype("selected_token_ids", ids, _INTEGER)
    _check_dtype("selected_token_mask", mask, (*_INTEGER, torch.bool))
    if ids.ndim != 1 or ids.numel() == 0:
        raise InvalidTensors(f"selected_token_ids must be a non-empty 1-D tensor, got shape {list(ids.shape)}")
    if mask.ndim != 1 or mask.numel() != logits_size:
        raise InvalidTensors(f"selected_token_mask must have shape [{logits_size}], got {list(mask.shape)}")
    _check_draft_ids(ids, logits_size)
    _check_binary("selected_token_mask", mask)
    return VocabMapping(selected_token_ids=ids.long(), selected_token_mask=mask.bool())


def validate_row_request(tensors: Mapping[str, torch.Tensor | None], *, logits_size: int) -> torch.Tensor:
    """The ``selected_token_ids`` of an ``/lm_head_rows`` body: int, 1-D, at most ``V`` distinct ids in ``[0, V)``."""
    ids = tensors.get("selected_token_ids")
    extra = sorted(set(tensors) - {"selected_token_ids"})
    if ids is None or extra:
        raise InvalidTensors(f"expected exactly the key 'selected_token_ids', got {sorted(tensors)}")
    if ids.dtype not in (torch.int64, torch.int32, torch.int16) or ids.ndim != 1 or ids.numel() == 0:
        raise InvalidTensors(
            f"selected_token_ids must be a non-empty 1-D integer tensor, got {ids.dtype} {list(ids.shape)}"
        )
    _check_draft_ids(ids, logits_size)
    return ids.long()
