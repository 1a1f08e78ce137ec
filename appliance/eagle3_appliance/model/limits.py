"""The request limits a server enforces, derived from the model and the device unless a flag sets them.

Upstream's server has no limits: it runs whatever arrives until memory runs out. Ours refuses
what cannot fit with a 422 that names the limit, so its defaults must accept whatever the
model and the hardware can do (``docs/operations.md``, "Limits"):

* ``max_seq_len``: the model's own context length (``max_position_embeddings``, or the
  equivalent key of its config); :data:`FALLBACK_MAX_SEQ_LEN` when the config names none.
* ``max_batch_tokens``: the working memory budget, less one slice of the LM head's logits
  (``--logits-slice-mib``, :mod:`eagle3_appliance.model.head_slices`), divided by what one
  token of a ``/generate`` needs at worst (:meth:`TargetShape.bytes_per_token`: the
  decoder's activations and the answer, with the draft vocabulary as large as it may be: the
  whole vocabulary). A session whose draft vocabulary is smaller may send as many tokens as
  its own answer allows (:meth:`ServingLimits.tokens_for`). The budget is, on CUDA,
  :data:`CUDA_BUDGET_FRACTION` of the memory free once the weights are loaded; on the CPU,
  the fixed :data:`CPU_BUDGET_BYTES`. With ``--logits-slice-mib 0`` the whole logits and
  their scratch count per token instead (:meth:`TargetShape.unsliced_bytes_per_token`).
* the draft vocabulary: at most the logits' width, each id once (checked in
  :mod:`eagle3_appliance.serving.validation`), so an answer is at most ``max_answer_bytes``.
* a packed batch's ``[B,1,T,T]`` attention mask: at most ``max_packed_mask_bytes`` (the working
  budget of a batch of ``max_batch_tokens``), since it grows with ``T`` squared.

``--max-seq-len`` and ``--max-batch-tokens`` override the first two.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from eagle3_appliance.model.head_slices import MIN_SLICE_ROWS, slice_bounds
from eagle3_appliance.settings import Settings
from eagle3_client.encodings import PROBS, wire_bytes_per_token

__all__ = [
    "CPU_BUDGET_BYTES",
    "CUDA_BUDGET_FRACTION",
    "FALLBACK_MAX_SEQ_LEN",
    "ServingLimits",
    "TargetShape",
    "derive_limits",
]

# Context length for a config that names none (the old default of --max-seq-len).
FALLBACK_MAX_SEQ_LEN = 8192
# Working memory of one /generate on the CPU, where "what is free" says little (swap, other jobs).
CPU_BUDGET_BYTES = 16 << 30
# Share of the memory free after loading that one /generate may use on CUDA; the rest is left
# to the allocator's fragmentation, NCCL's buffers and the caching of earlier answers.
CUDA_BUDGET_FRACTION = 0.8
# Config keys that hold a model's context length, in the order they are looked for.
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
# Activations kept per token and hidden unit at the peak of a decoder layer (residual, norm
# output, q/k/v/o projections, three aux captures, headroom), in model-dtype elements.
_HIDDEN_FACTOR = 19
# Per intermediate unit: the MLP's gate, up and activated product.
_MLP_FACTOR = 3
# Per vocabulary entry, beside the logits: the float32 answer (D = V at worst) and the
# projection's gathered/widened scratch (unsliced: one of each per token).
_VOCAB_EXTRA_BYTES = 8
# Per draft-vocabulary entry of the answer: target_probs in float32.
_PROBS_BYTES = 4
# input_ids and loss_mask (int64) and position_mask (bool) of the answer.
_ANSWER_FIXED_BYTES = 17


@dataclass(frozen=True)
class TargetShape:
    """What the memory of one token of a ``/generate`` depends on."""

    max_position_embeddings: int | None
    vocab_size: int  # the logits' width (an upper bound on the draft vocabulary)
    hidden_size: int
    intermediate_size: int | None
    dtype_bytes: int
    num_layers: int = 0  # decoder layers (a forward with output_hidden_states keeps one state each)

    @classmethod
    def of(cls, target: Any) -> TargetShape:
        """The shape of a loaded :class:`eagle3_appliance.model.target.Target`."""
        configs = [getattr(target.config, "text_config", None), target.config]
        context = None
        for config in (c for c in configs if c is not None):
            context = next((int(v) for k in _CONTEXT_KEYS if isinstance(v := getattr(config, k, None), int)), None)
            if context is not None:
                break
        config = configs[0] or configs[1]
        intermediate = getattr(config, "intermediate_size", None)
        return cls(
            max_position_embeddings=context,
            vocab_size=int(target.logits_size),
            hidden_size=int(target.hidden_size),
            intermediate_size=int(intermediate) if isinstance(intermediate, int) else None,
            dtype_bytes=target.dtype.itemsize,
            num_layers=int(getattr(target, "num_hidden_layers", 0) or 0),
        )

    def activation_bytes_per_token(self) -> int:
        """The decoder's activations of one token at the peak of a layer (aux captures included).

        Attention is taken to be memory-efficient (SDPA or flash attention, what transformers
        picks), i.e. linear in the length.
        """
        d = self.dtype_bytes
        intermediate = self.intermediate_size if self.intermediate_size is not None else 4 * self.hidden_size
        return self.hidden_size * d * _HIDDEN_FACTOR + intermediate * d * _MLP_FACTOR

    def bytes_per_token(self, draft_vocab: int | None = None) -> int:
        """Server memory one token of a ``/generate`` needs with the LM head over slices (an estimate with headroom).

        The decoder's activations and the answer: float32 probabilities over ``draft_vocab``
        (the whole vocabulary, the worst case, when None) and the ids and masks. The logits
        and the projection's scratch live in one slice (:meth:`slice_bytes_per_row`), not per token.
        """
        draft = self.vocab_size if draft_vocab is None else draft_vocab
        return self.activation_bytes_per_token() + draft * _PROBS_BYTES + _ANSWER_FIXED_BYTES

    def unsliced_bytes_per_token(self) -> int:
        """The same with the whole ``[B,T,V]`` logits at once (``--logits-slice-mib 0``, upstream's way):
        the logits and a whole-vocabulary answer with its scratch dominate for real models."""
        return self.vocab_size * (self.dtype_bytes + _VOCAB_EXTRA_BYTES) + self.bytes_per_token(draft_vocab=0)

    def slice_bytes_per_row(self) -> int:
        """One row of a logits slice: the logits (model dtype) and, at worst (D = V), the projection's
        gathered and float32-widened rows."""
        return self.vocab_size * (2 * self.dtype_bytes + _PROBS_BYTES)

    def slice_rows(self, slice_bytes: int) -> int:
        """Rows of one slice within ``slice_bytes`` (at least :data:`MIN_SLICE_ROWS`)."""
        return max(MIN_SLICE_ROWS, slice_bytes // self.slice_bytes_per_row())


@dataclass(frozen=True)
class ServingLimits:
    """The limits one server enforces, and where each came from (for the start-up log).

    ``working_bytes``: the memory the tokens of one request may use (the budget less one
    slice); ``slice_rows``: rows of one logits slice (None: the whole sequence at once);
    ``unsliced_tokens``: the most tokens the unsliced path holds in the same budget (on an
    accelerator, requests up to it keep that path, :meth:`sliced`).
    """

    max_seq_len: int
    max_batch_tokens: int
    max_draft_vocab: int
    max_answer_bytes: int
    sources: dict[str, str] = field(default_factory=dict)
    max_packed_mask_bytes: int | None = None  # None: unbounded (limits built by hand, in tests)
    working_bytes: int | None = None  # None: max_batch_tokens is the only bound (limits built by hand)
    slice_rows: int | None = None
    unsliced_tokens: int | None = None

    def tokens_for(self, bytes_per_token: int) -> int:
        """The most tokens of a request whose tokens need ``bytes_per_token`` each (a smaller answer:
        more tokens); never fewer than ``max_batch_tokens``, exactly it when a flag set it."""
        if self.working_bytes is None or self.sources.get("max_batch_tokens") == "--max-batch-tokens":
            return self.max_batch_tokens
        return max(self.max_batch_tokens, self.working_bytes // max(1, bytes_per_token))

    def sliced(self, device: torch.device, tokens: int, seq_len: int) -> int | None:
        """Rows per logits slice for a forward of ``tokens`` tokens in rows of ``seq_len`` (None: unsliced).

        One slice or less gains nothing. On an accelerator, whose kernels may sum another row
        count in another order, what the unsliced path can hold keeps it.
        """
        if self.slice_rows is None or len(slice_bounds(seq_len, self.slice_rows)) < 2:
            return None
        if device.type != "cpu" and self.unsliced_tokens is not None and tokens <= self.unsliced_tokens:
            return None
        return self.slice_rows

    def describe(self) -> str:
        slices = (
            "the LM head over the whole sequence"
            if self.slice_rows is None
            else f"the LM head over slices of {self.slice_rows:,} positions"
        )
        return (
            f"max_seq_len {self.max_seq_len:,} ({self.sources['max_seq_len']}), "
            f"max_batch_tokens {self.max_batch_tokens:,} ({self.sources['max_batch_tokens']}), "
            f"draft vocabulary at most {self.max_draft_vocab:,} ids (the logits, each id once), "
            f"answers at most {self.max_answer_bytes / (1 << 20):,.0f} MiB, {slices}"
        )


def _gib(nbytes: float) -> str:
    return f"{nbytes / (1 << 30):.1f} GiB"


def derive_limits(
    settings: Settings, shape: TargetShape, *, device: torch.device, free_bytes: int | None = None
) -> ServingLimits:
    """The limits for ``shape`` on ``device``; ``free_bytes`` is the device memory free after loading
    (read from CUDA when None). Explicit ``--max-seq-len`` / ``--max-batch-tokens`` win."""
    sources: dict[str, str] = {}
    if settings.max_seq_len is not None:
        max_seq_len, sources["max_seq_len"] = settings.max_seq_len, "--max-seq-len"
    elif shape.max_position_embeddings is not None:
        max_seq_len, sources["max_seq_len"] = shape.max_position_embeddings, "the model's max_position_embeddings"
    else:
        max_seq_len, sources["max_seq_len"] = FALLBACK_MAX_SEQ_LEN, "the config names no context length"
    if device.type == "cuda":
        if free_bytes is None:
            free_bytes = int(torch.cuda.mem_get_info(device)[0])
        budget = int(free_bytes * CUDA_BUDGET_FRACTION)
        where = f"{CUDA_BUDGET_FRACTION:.0%} of the {_gib(free_bytes)} free on {device} after loading"
    else:
        budget = CPU_BUDGET_BYTES
        where = f"the {_gib(CPU_BUDGET_BYTES)} CPU budget"
    slice_rows = shape.slice_rows(settings.logits_slice_mib << 20) if settings.logits_slice_mib > 0 else None
    if slice_rows is None:
        per_token, working = shape.unsliced_bytes_per_token(), budget
    else:
        per_token = shape.bytes_per_token()
        working = max(0, budget - slice_rows * shape.slice_bytes_per_row())
        where += f" less one logits slice of {slice_rows:,} positions"
    if settings.max_batch_tokens is not None:
        max_batch_tokens, sources["max_batch_tokens"] = settings.max_batch_tokens, "--max-batch-tokens"
        working = max_batch_tokens * per_token  # what other answer kinds may use (DFlash captures)
    else:
        max_batch_tokens = max(1, working // per_token)
        sources["max_batch_tokens"] = f"{where}, {per_token:,} B a token"
    # A probs answer with the largest draft vocabulary (D = V): a smaller D's answer within the
    # same working memory is smaller still (the answer's share of a token's memory grows with D).
    dims = {"hidden_size": shape.hidden_size, "draft_vocab": shape.vocab_size, "dtype_bytes": shape.dtype_bytes}
    return ServingLimits(
        max_seq_len=max_seq_len,
        max_batch_tokens=max_batch_tokens,
        max_draft_vocab=shape.vocab_size,
        max_answer_bytes=max_batch_tokens * wire_bytes_per_token(PROBS, **dims),
        sources=sources,
        # The working budget; a flag's tokens at their memory each when --max-batch-tokens is set.
        max_packed_mask_bytes=working if settings.max_batch_tokens is not None else budget,
        working_bytes=working,
        slice_rows=slice_rows,
        unsliced_tokens=max(1, budget // shape.unsliced_bytes_per_token()),
    )
