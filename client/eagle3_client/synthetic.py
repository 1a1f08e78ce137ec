"""Synthetic batches and draft vocabularies, shaped like the EAGLE-3 recipe's.

One generator for everything that drives a server without a dataset: the demo and
``validate``, the Locust users, the benchmarks and the tests. Deterministic for a seed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["padded_batch", "random_batch", "vocab_mapping"]


def vocab_mapping(
    vocab_size: int, draft_vocab: int, seed: int = 0, *, sort: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(selected_token_ids int64 [D], selected_token_mask bool [V])``: ``draft_vocab`` distinct random ids.

    Unsorted by default, as the recipe builds them (by token frequency); ``sort`` orders them.
    """
    if not 1 <= draft_vocab <= vocab_size:
        raise ValueError(f"draft vocab must be in [1, {vocab_size}] for this model, got {draft_vocab}")
    g = torch.Generator().manual_seed(seed)
    ids = torch.randperm(vocab_size, generator=g)[:draft_vocab]
    if sort:
        ids = ids.sort().values
    mask = torch.zeros(vocab_size, dtype=torch.bool)
    mask[ids] = True
    return ids.long(), mask


def padded_batch(
    vocab_size: int, lengths: Sequence[int], seq_len: int, seed: int, *, prompt_fraction: float = 1 / 3
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask, loss_mask)`` int64 ``[B, seq_len]``: row ``i`` holds ``lengths[i]``
    random tokens, right-padded with id 0; the loss covers each row after its prompt fraction."""
    if any(not 1 <= n <= seq_len for n in lengths):
        raise ValueError(f"every length must be in [1, {seq_len}], got {list(lengths)}")
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab_size, (len(lengths), seq_len), generator=g)
    positions = torch.arange(seq_len).unsqueeze(0)
    length = torch.tensor(list(lengths)).unsqueeze(1)
    prompt = (length.float() * prompt_fraction).long()
    attention_mask = (positions < length).long()
    loss_mask = ((positions >= prompt) & (positions < length)).long()
    return input_ids * attention_mask, attention_mask, loss_mask


def random_batch(
    vocab_size: int, batch_size: int, seq_len: int, seed: int, *, pad: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A recipe-like batch: every other row right-padded to a random shorter length (with ``pad``)."""
    g = torch.Generator().manual_seed(seed + 1_000_003)
    lengths = [
        seq_len if row % 2 == 0 or not pad else int(torch.randint(1, seq_len + 1, (1,), generator=g))
        for row in range(batch_size)
    ]
    return padded_batch(vocab_size, lengths, seq_len, seed)
