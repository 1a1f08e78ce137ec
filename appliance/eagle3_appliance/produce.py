"""``eagle3-appliance produce``: a dataset of pre-tokenized rows, as batches, computed ahead by a fleet.

Rows come from a JSONL file (one object per line) or a ``datasets`` folder written by
``save_to_disk``, each with ``input_ids``, ``loss_mask`` and optionally ``attention_mask``
(all ones when absent). Batches follow the dataset's order, as the recipe's collate forms them:
``batch_size`` rows right-padded to the longest with ``pad_token_id`` (attention and loss mask
0 there); with ``packed_sequence_size`` the rows are first packed with upstream's own packer
(``build_packed_eagle3_dataset``), and each batch carries ``position_ids``, ``seq_lens`` and
``doc_remaining``. The run itself is :class:`eagle3_client.streaming.producer.Producer`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

__all__ = ["batches_of", "load_vocab_mapping", "read_rows"]

# Most rows a dataset may hold for `produce` (its batches' token ids are held in memory).
MAX_ROWS = 10_000_000


def read_rows(path: str | Path) -> list[dict[str, list[int]]]:
    """The dataset's rows with ``input_ids``, ``loss_mask`` and ``attention_mask`` (ValueError naming a bad row)."""
    source = Path(path)
    raw: Iterator[dict[str, Any]]
    if source.is_dir():
        from datasets import load_from_disk

        raw = iter(load_from_disk(str(source)))
    elif source.is_file():
        raw = _jsonl(source)
    else:
        raise ValueError(f"--dataset {source}: no such file or folder")
    rows = []
    for number, row in enumerate(raw, start=1):
        if number > MAX_ROWS:
            raise ValueError(f"--dataset {source}: more than {MAX_ROWS} rows")
        rows.append(_row(row, f"{source} row {number}"))
    if not rows:
        raise ValueError(f"--dataset {source}: no rows")
    return rows


def _jsonl(path: Path) -> Iterator[dict[str, Any]]:
    with path.open() as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path} line {number}: not JSON ({exc})") from None


def _row(row: Any, where: str) -> dict[str, list[int]]:
    if not isinstance(row, dict):
        raise ValueError(f"{where}: a row is an object with input_ids and loss_mask")
    ids, loss = row.get("input_ids"), row.get("loss_mask")
    attention = row.get("attention_mask") or ([1] * len(ids) if isinstance(ids, list) else None)
    for name, value in (("input_ids", ids), ("loss_mask", loss), ("attention_mask", attention)):
        if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise ValueError(f"{where}: {name} must be a list of integers")
    assert isinstance(ids, list) and isinstance(loss, list) and isinstance(attention, list)
    if not ids or len(loss) != len(ids) or len(attention) != len(ids):
        raise ValueError(f"{where}: input_ids, loss_mask and attention_mask must have one equal, non-zero length")
    return {"input_ids": ids, "loss_mask": loss, "attention_mask": attention}


def batches_of(
    rows: list[dict[str, list[int]]], batch_size: int, *, packed_sequence_size: int = 0, pad_token_id: int = 0
) -> list[dict[str, torch.Tensor]]:
    """One epoch's batches in dataset order (the module docstring says how they are formed)."""
    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
    if packed_sequence_size > 0:
        from nemo_automodel.components.datasets.llm.eagle3 import _pack_collate, build_packed_eagle3_dataset

        packs = build_packed_eagle3_dataset(rows, packed_sequence_size=packed_sequence_size, pad_token_id=pad_token_id)
        return [_pack_collate(packs[i : i + batch_size]) for i in range(0, len(packs), batch_size)]
    out = []
    for start in range(0, len(rows), batch_size):
        group = rows[start : start + batch_size]
        width = max(len(r["input_ids"]) for r in group)
        batch = {}
        for key, pad in (("input_ids", pad_token_id), ("attention_mask", 0), ("loss_mask", 0)):
            batch[key] = torch.tensor([r[key] + [pad] * (width - len(r[key])) for r in group], dtype=torch.long)
        out.append(batch)
    return out


def load_vocab_mapping(path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """``(selected_token_ids, selected_token_mask)`` from a torch file: a dict with those keys, or a pair."""
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(loaded, dict):
        pair = (loaded.get("selected_token_ids"), loaded.get("selected_token_mask"))
    elif isinstance(loaded, (list, tuple)) and len(loaded) == 2:
        pair = (loaded[0], loaded[1])
    else:
        pair = (None, None)
    if not all(isinstance(t, torch.Tensor) for t in pair):
        raise ValueError(
            f"--vocab-mapping {path}: expected a torch file holding selected_token_ids and selected_token_mask"
        )
    return pair  # type: ignore[return-value]
