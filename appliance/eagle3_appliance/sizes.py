"""``eagle3-appliance sizes``: bytes on the wire per token and per batch for each supervision encoding,
and for DFlash-style captures (a layer set, with or without the full-vocabulary logits).

Only a model's shape matters (hidden size, vocabulary, dtype), so this reads a local
``config.json`` or a built-in preset and never downloads anything. The arithmetic is
:func:`eagle3_client.encodings.wire_bytes_per_token`, the same function the tests check against
measured response lengths.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from eagle3_client.capture import Capture
from eagle3_client.encodings import Encoding, parse_encoding, payload_bytes_per_token, wire_bytes_per_token

__all__ = ["PRESETS", "ModelShape", "SizeRow", "capture_rows", "load_shape", "render_table", "size_rows"]


@dataclass(frozen=True)
class ModelShape:
    """What the wire size depends on: the hidden size and the full vocabulary (an upper bound on D)."""

    name: str
    hidden_size: int
    vocab_size: int
    num_hidden_layers: int | None = None  # checks a capture's layer ids when known


PRESETS: dict[str, ModelShape] = {
    shape.name: shape
    for shape in (
        ModelShape("llama-3.1-8b", hidden_size=4096, vocab_size=128256, num_hidden_layers=32),
        ModelShape("qwen3-8b", hidden_size=4096, vocab_size=151936, num_hidden_layers=36),
        ModelShape("llama-3.1-70b", hidden_size=8192, vocab_size=128256, num_hidden_layers=80),
    )
}


def load_shape(model: str) -> ModelShape:
    """A preset name, a folder holding ``config.json``, or a ``config.json`` file."""
    preset = PRESETS.get(model.strip().lower())
    if preset is not None:
        return preset
    path = Path(model)
    config_path = path / "config.json" if path.is_dir() else path
    if not config_path.is_file():
        raise ValueError(f"{model!r} is neither a preset ({', '.join(PRESETS)}) nor a folder with config.json")
    config = json.loads(config_path.read_text())
    text = config.get("text_config") or config  # multimodal checkpoints nest the LM's config
    layers = text.get("num_hidden_layers")
    try:
        return ModelShape(
            str(model),
            hidden_size=int(text["hidden_size"]),
            vocab_size=int(text["vocab_size"]),
            num_hidden_layers=int(layers) if isinstance(layers, int) else None,
        )
    except KeyError as exc:
        raise ValueError(f"{config_path} has no {exc.args[0]!r}") from None


@dataclass(frozen=True)
class SizeRow:
    """One answer kind on one model: an EAGLE-3 ``encoding``, or a DFlash-style ``capture``."""

    model: str
    encoding: Encoding | None
    bytes_per_token: int
    payload_per_token: int
    batch_tokens: int
    capture: Capture | None = None

    @property
    def bytes_per_batch(self) -> int:
        return self.bytes_per_token * self.batch_tokens

    @property
    def name(self) -> str:
        return self.capture.spec if self.capture is not None else self.encoding.name if self.encoding else "?"

    @property
    def exact(self) -> str:
        if self.encoding is None:
            return "yes"  # the layers and logits as computed
        return "lossy" if self.encoding.lossy else ("~" if self.encoding.kind == "hidden" else "yes")


def capture_rows(shape: ModelShape, *, captures: list[str], dtype_bytes: int, batch_tokens: int) -> list[SizeRow]:
    """One row per DFlash-style capture (``dflash:L1,L2,..`` or ``dflash+logits:..``); ValueError for a bad one.

    Per token the answer is ``n x H`` hidden units and, with logits, ``V`` more, all in the model
    dtype; the request's ids and masks are not echoed (the client keeps them).
    """
    rows = []
    for spec in captures:
        capture = Capture.parse(spec)
        if capture.is_eagle3:
            raise ValueError("list EAGLE-3 answers with --encoding; --capture takes dflash:... captures")
        if shape.num_hidden_layers is not None:
            capture.checked(shape.num_hidden_layers)
        width = len(capture.layers) * shape.hidden_size + (shape.vocab_size if capture.logits else 0)
        per_token = width * dtype_bytes
        rows.append(SizeRow(shape.name, None, per_token, per_token, batch_tokens, capture=capture))
    return rows


def size_rows(
    shape: ModelShape, *, draft_vocab: int, dtype_bytes: int, encodings: list[str], batch_tokens: int
) -> list[SizeRow]:
    """One row per encoding; ValueError when the draft vocabulary or K does not fit the model."""
    if not 1 <= draft_vocab <= shape.vocab_size:
        raise ValueError(f"draft vocabulary {draft_vocab} must lie in [1, {shape.vocab_size}] for {shape.name}")
    rows = []
    for name in encodings:
        encoding = parse_encoding(name)
        if encoding.k is not None and encoding.k > draft_vocab:
            raise ValueError(f"{encoding.name} keeps more entries than the draft vocabulary ({draft_vocab})")
        dims = {"hidden_size": shape.hidden_size, "draft_vocab": draft_vocab, "dtype_bytes": dtype_bytes}
        rows.append(
            SizeRow(
                shape.name,
                encoding,
                wire_bytes_per_token(encoding, **dims),
                payload_bytes_per_token(encoding, **dims),
                batch_tokens,
            )
        )
    return rows


def _human(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    raise AssertionError("unreachable")


def render_table(rows: list[SizeRow], *, markdown: bool = False) -> str:
    """A table of the rows; the share is relative to the same model's ``probs`` row (if present)."""
    probs = {r.model: r.bytes_per_token for r in rows if r.encoding is not None and r.encoding.kind == "probs"}
    batch_tokens = rows[0].batch_tokens if rows else 0
    header = ["model", "encoding", "bytes/token", f"per {batch_tokens}-token batch", "vs probs", "exact?"]
    body = []
    for r in rows:
        share = f"{100 * r.bytes_per_token / probs[r.model]:.1f} %" if r.model in probs else "-"
        body.append([r.model, r.name, f"{r.bytes_per_token:,}", _human(r.bytes_per_batch), share, r.exact])
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(cells) + " |" for cells in body]
        return "\n".join(lines)
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in [header, *body]
    )
