"""Synthetic batches and draft vocabularies, shaped like the EAGLE-3 recipe's.

One generator for everything that drives a server without a dataset: the demo and
``validate``, the Locust users, the benchmarks and the tests. Deterministic for a seed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["pack_rows", "packed_batch", "padded_batch", "random_batch", "vocab_mapping"]


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


def pack_rows(lengths: Sequence[int], seq_len: int) -> list[list[int]]:
    """Document lengths grouped into rows of ``seq_len`` tokens, first fit in order (as the recipe's packer)."""
    rows: list[list[int]] = []
    for n in lengths:
        if not 1 <= n <= seq_len:
            raise ValueError(f"every document length must be in [1, {seq_len}], got {n}")
        if rows and sum(rows[-1]) + n <= seq_len:
            rows[-1].append(n)
        else:
            rows.append([n])
    return rows


def packed_batch(
    vocab_size: int, rows: Sequence[Sequence[int]], seq_len: int, seed: int, *, prompt_fraction: float = 1 / 3
) -> dict[str, torch.Tensor]:
    """A packed batch laid out as the recipe's ``packed_sequence_size`` rows: row ``i`` holds documents of
    ``rows[i]`` tokens, then pad (id 0).

    Keys: ``input_ids``, ``attention_mask``, ``loss_mask``, ``position_ids`` (restarting at every
    document, continuing through the pad), ``seq_lens`` ``[B, max_docs]`` (0-padded; the pad counts
    to the last document, so each row sums to ``seq_len``) and ``doc_remaining`` (real tokens after
    each slot within its document; 0 on pad). All int64.
    """
    if not rows or any(not r or sum(r) > seq_len or min(r) < 1 for r in rows):
        raise ValueError(f"every row needs documents of at least 1 token, at most {seq_len} in all, got {rows}")
    g = torch.Generator().manual_seed(seed)
    batch, max_docs = len(rows), max(len(r) for r in rows)
    input_ids = torch.randint(0, vocab_size, (batch, seq_len), generator=g)
    out = {
        key: torch.zeros(batch, seq_len, dtype=torch.long) for key in ("attention_mask", "loss_mask", "doc_remaining")
    }
    position_ids = torch.zeros(batch, seq_len, dtype=torch.long)
    seq_lens = torch.zeros(batch, max_docs, dtype=torch.long)
    for i, docs in enumerate(rows):
        start = 0
        for n in docs:
            prompt = int(n * prompt_fraction)
            out["attention_mask"][i, start : start + n] = 1
            out["loss_mask"][i, start + prompt : start + n] = 1
            out["doc_remaining"][i, start : start + n] = torch.arange(n - 1, -1, -1)
            position_ids[i, start : start + n] = torch.arange(n)
            start += n
        pad = seq_len - start
        input_ids[i, start:] = 0
        position_ids[i, start:] = (torch.arange(pad) + docs[-1]).clamp(max=seq_len - 1)
        seq_lens[i, : len(docs)] = torch.tensor(list(docs))
        seq_lens[i, len(docs) - 1] += pad
    return {
        "input_ids": input_ids,
        "attention_mask": out["attention_mask"],
        "loss_mask": out["loss_mask"],
        "position_ids": position_ids,
        "seq_lens": seq_lens,
        "doc_remaining": out["doc_remaining"],
    }
