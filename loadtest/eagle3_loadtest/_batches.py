"""Training-shaped ``/generate`` requests: lengths drawn from a distribution, padded or packed.

A trainer rank sends ``[B,T]`` batches of right-padded samples: each sample has a prompt
(loss mask 0) and a response (loss mask 1), and the padding has attention and loss mask 0.
Lengths vary from batch to batch, which is what makes the server's latency vary, so they are
drawn from a configurable distribution rather than fixed. With ``packed_sequence_size`` the
samples are packed instead, several to a row of that width, as the recipe does
(:func:`eagle3_client.synthetic.packed_batch`: ``position_ids``, ``seq_lens``, ``doc_remaining``).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

from eagle3_client.protocol import GENERATE_INPUT_KEYS, VOCAB_MAPPING_KEYS
from eagle3_client.synthetic import packed_batch, padded_batch, vocab_mapping

__all__ = ["BatchSpec", "LengthDistribution", "PADDING_CHOICES", "make_batch", "make_vocab_mapping"]

# "longest": pad to the longest sample of the batch (dynamic padding, the usual collator);
# "max": pad every batch to --max-seq-len (fixed shapes).
PADDING_CHOICES = ("longest", "max")
_KINDS = {"fixed": 1, "uniform": 2, "normal": 2, "lognormal": 2}


@dataclass(frozen=True)
class LengthDistribution:
    """Sample lengths in ``[1, max_len]``.

    Spec strings: ``fixed:N``, ``uniform:LO:HI``, ``normal:MEAN:STD`` and
    ``lognormal:MEDIAN:SIGMA`` (a realistic long tail). Draws are clamped to ``[1, max_len]``.
    """

    kind: str
    params: tuple[float, ...]
    max_len: int

    @classmethod
    def parse(cls, spec: str, max_len: int) -> LengthDistribution:
        kind, _, rest = spec.strip().partition(":")
        if kind not in _KINDS:
            raise ValueError(f"unknown length distribution {kind!r} in {spec!r}; use one of {sorted(_KINDS)}")
        try:
            params = tuple(float(p) for p in rest.split(":")) if rest else ()
        except ValueError:
            raise ValueError(f"length distribution {spec!r} has a non-numeric parameter") from None
        if len(params) != _KINDS[kind]:
            raise ValueError(f"{kind} takes {_KINDS[kind]} parameter(s), got {spec!r}")
        if max_len < 1:
            raise ValueError(f"max sequence length must be at least 1, got {max_len}")
        if kind == "uniform" and params[0] > params[1]:
            raise ValueError(f"uniform:LO:HI needs LO <= HI, got {spec!r}")
        if kind in ("normal", "lognormal") and params[1] < 0:
            raise ValueError(f"the spread of {spec!r} must not be negative")
        return cls(kind, params, max_len)

    def sample(self, rng: random.Random) -> int:
        p = self.params
        if self.kind == "fixed":
            value = p[0]
        elif self.kind == "uniform":
            value = rng.uniform(p[0], p[1])
        elif self.kind == "normal":
            value = rng.gauss(p[0], p[1])
        else:
            value = rng.lognormvariate(math.log(max(p[0], 1.0)), p[1])
        return min(max(int(round(value)), 1), self.max_len)


@dataclass(frozen=True)
class BatchSpec:
    """Everything that decides the shape and content of one ``/generate`` batch."""

    batch_size: int
    lengths: LengthDistribution
    vocab_size: int
    padding: str = "longest"
    prompt_fraction: float = 0.25
    packed_sequence_size: int = 0  # > 0: batch_size packed rows of this width instead of padded samples

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch size must be at least 1, got {self.batch_size}")
        if self.padding not in PADDING_CHOICES:
            raise ValueError(f"padding must be one of {PADDING_CHOICES}, got {self.padding!r}")
        if not 0.0 <= self.prompt_fraction < 1.0:
            raise ValueError(f"prompt fraction must be in [0, 1), got {self.prompt_fraction}")
        if self.vocab_size < 1:
            raise ValueError(f"vocab size must be at least 1, got {self.vocab_size}")


def make_batch(spec: BatchSpec, rng: random.Random) -> dict[str, torch.Tensor]:
    """``input_ids``, ``attention_mask`` and ``loss_mask`` (int64 ``[B,T]``), right-padded with id 0
    (packed: ``B`` rows of ``packed_sequence_size`` and the three packing tensors)."""
    if spec.packed_sequence_size > 0:
        return _packed(spec, rng)
    lengths = [spec.lengths.sample(rng) for _ in range(spec.batch_size)]
    seq_len = max(lengths) if spec.padding == "longest" else spec.lengths.max_len
    batch = padded_batch(spec.vocab_size, lengths, seq_len, rng.getrandbits(63), prompt_fraction=spec.prompt_fraction)
    return dict(zip(GENERATE_INPUT_KEYS, batch, strict=True))


def _packed(spec: BatchSpec, rng: random.Random) -> dict[str, torch.Tensor]:
    """``batch_size`` rows, each filled with samples until the next one does not fit (it starts the next row)."""
    width = spec.packed_sequence_size
    rows: list[list[int]] = [[]]
    while True:
        sample = min(spec.lengths.sample(rng), width)
        if sum(rows[-1]) + sample <= width:
            rows[-1].append(sample)
        elif len(rows) == spec.batch_size:
            break
        else:
            rows.append([sample])
    return packed_batch(spec.vocab_size, rows, width, rng.getrandbits(63), prompt_fraction=spec.prompt_fraction)


def make_vocab_mapping(vocab_size: int, draft_vocab: int, seed: int) -> dict[str, torch.Tensor]:
    """A sorted draft vocabulary of ``draft_vocab`` distinct ids, the same for every user with the same seed.

    Every user of a run must send the same mapping: on a server without sessions the
    mapping is shared, and a user whose mapping was replaced by another's would get
    (correct) answers for the wrong draft vocabulary.
    """
    return dict(zip(VOCAB_MAPPING_KEYS, vocab_mapping(vocab_size, draft_vocab, seed, sort=True), strict=True))
