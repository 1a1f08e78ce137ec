"""Supervision encodings, client side: names, sizes, and decoding an answer into ``target_probs``.

Upstream ships the draft-vocabulary distribution as float32 probabilities ``[B,T,D]``,
which is most of every ``/generate`` answer. The same information can travel smaller and
the trainer's device can finish the last step; whatever travelled, the recipe always gets
``target_probs`` float32 ``[B,T,D]`` and ``position_mask`` bool ``[B,T,1]`` on its device.

=============  ==============================================  ===============================
encoding       what travels instead of ``target_probs``         what the client does
=============  ==============================================  ===============================
``probs``      float32 probabilities (upstream, the default)    nothing
``logits``     draft-vocab logits in the model dtype            ``softmax(x.float(), -1)``
``hidden``     the LM head's input ``[B,T,H]``, model dtype     ``softmax(linear(h, W_D).float())``
``topk:K``     the K largest probabilities + their indices      scatter, renormalise (lossy)
=============  ==============================================  ===============================

Every encoding ships the shifted rows with the zero tail row (upstream's shift), so the
client's last step reproduces the reference tail (the softmax of a zero row) by itself.
This module imports nothing from the appliance: a trainer needs only torch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from eagle3_client import protocol
from eagle3_client.errors import ProtocolViolation
from eagle3_client.quoting import quote

__all__ = [
    "INT16_MAX_VOCAB",
    "PROBS",
    "Decoded",
    "Encoding",
    "EncodingStats",
    "decode_supervision",
    "detect_encoding",
    "parse_encoding",
    "payload_bytes_per_token",
    "response_bytes",
    "topk_index_dtype",
    "wire_bytes_per_token",
]

# int16 indices address draft vocabularies of up to 32768 entries (indices 0..32767).
INT16_MAX_VOCAB = 2**15

_KINDS = (protocol.ENCODING_PROBS, protocol.ENCODING_LOGITS, protocol.ENCODING_HIDDEN, protocol.ENCODING_TOPK)


@dataclass(frozen=True)
class Encoding:
    """A parsed encoding name: ``kind`` is one of probs/logits/hidden/topk, ``k`` only for topk."""

    kind: str
    k: int | None = None

    @property
    def name(self) -> str:
        return f"{self.kind}:{self.k}" if self.kind == protocol.ENCODING_TOPK else self.kind

    @property
    def lossy(self) -> bool:
        return self.kind == protocol.ENCODING_TOPK

    @property
    def keys(self) -> tuple[str, ...]:
        """The ``/generate`` response keys, in wire order."""
        return protocol.ENCODING_KEYS[self.kind]

    def __str__(self) -> str:
        return self.name


PROBS = Encoding(protocol.ENCODING_PROBS)


def parse_encoding(name: str) -> Encoding:
    """``"probs" | "logits" | "hidden" | "topk:K"`` (K >= 1) -> :class:`Encoding`; ValueError otherwise.

    ``K <= D`` can only be checked once the draft vocabulary is known (the server does it
    at ``/set_vocab_mapping``).
    """
    if not isinstance(name, str):
        raise ValueError(f"an encoding name must be a string, got {type(name).__name__}")
    text = name.strip().lower()
    kind, sep, arg = text.partition(":")
    if kind == protocol.ENCODING_TOPK:
        if not sep:
            raise ValueError("the topk encoding needs a size: 'topk:K', e.g. 'topk:64'")
        try:
            k = int(arg)
        except ValueError:
            raise ValueError(f"'topk:K' needs an integer K, got {quote(arg)}") from None
        if k < 1:
            raise ValueError(f"'topk:K' needs K >= 1, got {k}")
        return Encoding(kind, k)
    if kind in _KINDS and not sep:
        return Encoding(kind)
    raise ValueError(f"unknown supervision encoding {quote(name)}; expected one of probs, logits, hidden, topk:K")


def topk_index_dtype(draft_vocab: int) -> torch.dtype:
    """int16 when every draft-vocab index fits in it, else int32."""
    return torch.int16 if draft_vocab <= INT16_MAX_VOCAB else torch.int32


def detect_encoding(tensors: Mapping[str, object]) -> Encoding:
    """Which encoding an answer uses, from its keys (transport-independent)."""
    if "target_probs" in tensors:
        return PROBS
    if protocol.KEY_DRAFT_LOGITS in tensors:
        return Encoding(protocol.ENCODING_LOGITS)
    if protocol.KEY_FINAL_HIDDEN in tensors:
        return Encoding(protocol.ENCODING_HIDDEN)
    values = tensors.get(protocol.KEY_TOPK_VALUES)
    if isinstance(values, torch.Tensor) and values.ndim == 3:
        return Encoding(protocol.ENCODING_TOPK, int(values.shape[-1]))
    return PROBS  # let the key check report what a probs answer lacks


# -- sizes --------------------------------------------------------------------------------

# ndim of each response key, for the wire format's per-entry header (shape is ndim x i64).
_KEY_NDIM = {
    "aux_hidden_states": 3,
    "target_probs": 3,
    protocol.KEY_DRAFT_LOGITS: 3,
    protocol.KEY_FINAL_HIDDEN: 3,
    protocol.KEY_TOPK_VALUES: 3,
    protocol.KEY_TOPK_INDICES: 3,
    "position_mask": 3,
    "input_ids": 2,
    "loss_mask": 2,
}


def payload_bytes_per_token(encoding: Encoding | str, *, hidden_size: int, draft_vocab: int, dtype_bytes: int) -> int:
    """Bytes per token of what replaces ``target_probs`` (``dtype_bytes``: the model dtype's size)."""
    enc = parse_encoding(encoding) if isinstance(encoding, str) else encoding
    if enc.kind == protocol.ENCODING_PROBS:
        return 4 * draft_vocab
    if enc.kind == protocol.ENCODING_LOGITS:
        return dtype_bytes * draft_vocab
    if enc.kind == protocol.ENCODING_HIDDEN:
        return dtype_bytes * hidden_size
    assert enc.k is not None
    return enc.k * (4 + topk_index_dtype(draft_vocab).itemsize)


def wire_bytes_per_token(
    encoding: Encoding | str,
    *,
    hidden_size: int,
    draft_vocab: int,
    dtype_bytes: int,
    ids_bytes: int = 8,
    loss_mask_bytes: int = 8,
) -> int:
    """Bytes per token of a whole ``/generate`` answer, without the fixed per-answer headers.

    ``aux_hidden_states`` (3H x model dtype) + the encoding's payload + ``position_mask``
    (1 byte, bool) + ``input_ids`` and ``loss_mask``, which come back in the dtype the
    client sent them (int64, 8 bytes, for upstream's client and ours).
    """
    aux = 3 * hidden_size * dtype_bytes
    payload = payload_bytes_per_token(
        encoding, hidden_size=hidden_size, draft_vocab=draft_vocab, dtype_bytes=dtype_bytes
    )
    return aux + payload + 1 + ids_bytes + loss_mask_bytes


def response_bytes(
    encoding: Encoding | str,
    *,
    batch: int,
    seq_len: int,
    hidden_size: int,
    draft_vocab: int,
    dtype_bytes: int,
    ids_bytes: int = 8,
    loss_mask_bytes: int = 8,
) -> int:
    """The exact length of a ``/generate`` wire body: per-token bytes plus magic and entry headers."""
    enc = parse_encoding(encoding) if isinstance(encoding, str) else encoding
    per_token = wire_bytes_per_token(
        enc,
        hidden_size=hidden_size,
        draft_vocab=draft_vocab,
        dtype_bytes=dtype_bytes,
        ids_bytes=ids_bytes,
        loss_mask_bytes=loss_mask_bytes,
    )
    # magic; per entry: u32 key_len, key, u8 flags, u8 dtype, u8 ndim, ndim x i64, u64 nbytes
    headers = 4 + sum(4 + len(key.encode()) + 3 + 8 * _KEY_NDIM[key] + 8 for key in enc.keys)
    return batch * seq_len * per_token + headers


# -- decoding -----------------------------------------------------------------------------


@dataclass
class Decoded:
    """What the recipe needs, on the trainer's device; ``kept_mass`` ``[B,T]`` only for topk."""

    target_probs: torch.Tensor
    position_mask: torch.Tensor
    kept_mass: torch.Tensor | None = None


def _softmax_float(x: torch.Tensor) -> torch.Tensor:
    # Exactly the reference's last step: upcast, then softmax over the draft vocabulary.
    return torch.softmax(x.float(), dim=-1)


def decode_supervision(
    tensors: Mapping[str, torch.Tensor],
    encoding: Encoding,
    *,
    device: torch.device,
    draft_vocab: int | None = None,
    lm_head_rows: Callable[[], torch.Tensor] | None = None,
) -> Decoded:
    """Turn one answer's encoding tensors into ``target_probs`` float32 ``[B,T,D]`` on ``device``.

    ``draft_vocab`` is needed by ``topk`` (the width to scatter into); ``lm_head_rows`` by
    ``hidden``: it returns ``W_D = lm_head.weight[selected_token_ids]`` ``[D,H]`` on
    ``device`` (fetched once per vocab mapping by the caller).
    """
    position_mask = tensors["position_mask"].to(device).bool()
    kind = encoding.kind
    if kind == protocol.ENCODING_PROBS:
        return Decoded(tensors["target_probs"].to(device), position_mask)
    if kind == protocol.ENCODING_LOGITS:
        return Decoded(_softmax_float(tensors[protocol.KEY_DRAFT_LOGITS].to(device)), position_mask)
    if kind == protocol.ENCODING_HIDDEN:
        if lm_head_rows is None:
            raise ValueError("decoding the 'hidden' encoding needs the LM head's draft-vocab rows")
        hidden = tensors[protocol.KEY_FINAL_HIDDEN].to(device)
        weight = lm_head_rows()
        if weight.ndim != 2 or weight.shape[1] != hidden.shape[-1]:
            raise ProtocolViolation(
                f"LM-head rows of shape {list(weight.shape)} do not fit a hidden state of shape {list(hidden.shape)}"
            )
        # The same op as the model's bias-free LM head, on the rows of the draft vocabulary
        # only; a zero (tail) row projects to zero logits, i.e. the reference's tail.
        logits = torch.nn.functional.linear(hidden, weight.to(device=hidden.device, dtype=hidden.dtype))
        return Decoded(_softmax_float(logits), position_mask)
    if kind == protocol.ENCODING_TOPK:
        if draft_vocab is None:
            raise ValueError("decoding 'topk:K' needs the draft vocabulary size")
        values = tensors[protocol.KEY_TOPK_VALUES].to(device).float()
        indices = tensors[protocol.KEY_TOPK_INDICES].to(device).long()
        if values.shape != indices.shape or values.shape[-1] != encoding.k:
            raise ProtocolViolation(
                f"{encoding.name} answer has values {list(values.shape)} and indices {list(indices.shape)}"
            )
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= draft_vocab):
            raise ProtocolViolation(f"{encoding.name} indices outside the draft vocabulary [0, {draft_vocab})")
        kept = values.sum(dim=-1, keepdim=True)
        probs = torch.zeros((*values.shape[:-1], draft_vocab), dtype=torch.float32, device=values.device)
        probs.scatter_(-1, indices, values / kept)
        return Decoded(probs, position_mask, kept.squeeze(-1))
    raise ValueError(f"cannot decode encoding {encoding.name!r}")


class EncodingStats:
    """Running counts per encoding and the probability mass that ``topk`` kept.

    The kept mass is averaged over supervised positions (``position_mask``), the ones the
    recipe's loss reads. Sums stay on the device until :meth:`as_dict`, so recording a
    batch never synchronises the trainer's GPU.
    """

    def __init__(self) -> None:
        self.batches: dict[str, int] = {}
        self._kept_sum: torch.Tensor | None = None
        self._kept_count: torch.Tensor | None = None
        self._kept_min: torch.Tensor | None = None

    def record(self, encoding: Encoding, decoded: Decoded) -> None:
        self.batches[encoding.name] = self.batches.get(encoding.name, 0) + 1
        if decoded.kept_mass is None:
            return
        mask = decoded.position_mask.squeeze(-1)
        kept = decoded.kept_mass
        masked = torch.where(mask, kept, torch.ones_like(kept))
        batch_sum, batch_count, batch_min = (kept * mask).sum(), mask.sum(), masked.min()
        if self._kept_sum is None:
            self._kept_sum, self._kept_count, self._kept_min = batch_sum, batch_count, batch_min
        else:
            assert self._kept_count is not None and self._kept_min is not None
            self._kept_sum = self._kept_sum + batch_sum
            self._kept_count = self._kept_count + batch_count
            self._kept_min = torch.minimum(self._kept_min, batch_min)

    def as_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"batches": dict(self.batches)}
        if self._kept_sum is not None and self._kept_count is not None and int(self._kept_count) > 0:
            out["topk_kept_mass_mean"] = float(self._kept_sum) / int(self._kept_count)
            out["topk_kept_mass_min"] = float(self._kept_min)  # type: ignore[arg-type]
            out["topk_supervised_positions"] = int(self._kept_count)
        return out
