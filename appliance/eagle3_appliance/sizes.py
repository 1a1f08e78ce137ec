"""``eagle3-appliance sizes``: bytes on the wire per token and per batch for each supervision encoding,
and for DFlash-style captures (a layer set, with or without the full-vocabulary logits); and the
longest sample one GPU holds, with the LM head over the whole sequence and over slices.

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

__all__ = [
    "GPU_MEMORY_GIB",
    "PRESETS",
    "LongestRow",
    "ModelShape",
    "SizeRow",
    "capture_rows",
    "load_shape",
    "longest_rows",
    "render_longest",
    "render_table",
    "size_rows",
]


@dataclass(frozen=True)
class ModelShape:
    """What the wire size depends on: the hidden size and the full vocabulary (an upper bound on D);
    the memory table also needs the MLP width, the context and the parameter count (presets only)."""

    name: str
    hidden_size: int
    vocab_size: int
    num_hidden_layers: int | None = None  # checks a capture's layer ids when known
    intermediate_size: int | None = None
    max_position_embeddings: int | None = None
    parameters: int | None = None
    tensor_parallel: tuple[int, ...] = (1,)  # the sizes of the memory table's tensor-parallel rows


PRESETS: dict[str, ModelShape] = {
    shape.name: shape
    for shape in (
        ModelShape("llama-3.1-8b", 4096, 128256, 32, 14336, 131072, 8_030_261_248),
        ModelShape("qwen3-8b", 4096, 151936, 36, 12288, 40960, 8_190_735_360),
        ModelShape("llama-3.1-70b", 8192, 128256, 80, 28672, 131072, 70_553_706_496, tensor_parallel=(4, 8)),
    )
}
# GPU memory sizes of the memory table, GiB.
GPU_MEMORY_GIB = (40, 80, 141)


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
    intermediate, context = text.get("intermediate_size"), text.get("max_position_embeddings")
    try:
        return ModelShape(
            str(model),
            hidden_size=int(text["hidden_size"]),
            vocab_size=int(text["vocab_size"]),
            num_hidden_layers=int(layers) if isinstance(layers, int) else None,
            intermediate_size=int(intermediate) if isinstance(intermediate, int) else None,
            max_position_embeddings=int(context) if isinstance(context, int) else None,
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
    """One row per capture other than EAGLE-3 (``dflash:L1,L2,..``, ``dflash+logits:..``, ``dspark:..``,
    ``vispec``, ``msd``, ``eagle``); ValueError for a bad one.

    Per token the answer is ``n x H`` hidden units and, with logits, ``V`` more (DSpark: ``(n+1) x H``),
    all in the model dtype; the request's ids and masks are not echoed (the client keeps them).
    """
    rows = []
    for spec in captures:
        capture = Capture.parse(spec)
        if capture.is_eagle3:
            raise ValueError("list EAGLE-3 answers with --encoding; --capture takes dflash:... captures")
        if shape.num_hidden_layers is not None:
            capture.checked(shape.num_hidden_layers)
        tensors = len(capture.layers) + (1 if capture.is_dspark else 0)  # DSpark: and the final norm's output
        width = tensors * shape.hidden_size + (shape.vocab_size if capture.logits else 0)
        if capture.is_vlm:  # ViSpec, MSD: the embedding output, the last hidden state and the logits
            width = 2 * shape.hidden_size + shape.vocab_size
        if capture.is_eagle:  # EAGLE-1/2: the last hidden state and its logits
            width = shape.hidden_size + shape.vocab_size
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


def _format_table(header: list[str], body: list[list[str]], markdown: bool) -> str:
    """Aligned columns for a terminal, or a Markdown table for the docs."""
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(cells) + " |" for cells in body]
        return "\n".join(lines)
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in [header, *body]
    )


def render_table(rows: list[SizeRow], *, markdown: bool = False) -> str:
    """A table of the rows; the share is relative to the same model's ``probs`` row (if present)."""
    probs = {r.model: r.bytes_per_token for r in rows if r.encoding is not None and r.encoding.kind == "probs"}
    batch_tokens = rows[0].batch_tokens if rows else 0
    header = ["model", "encoding", "bytes/token", f"per {batch_tokens}-token batch", "vs probs", "exact?"]
    body = []
    for r in rows:
        share = f"{100 * r.bytes_per_token / probs[r.model]:.1f} %" if r.model in probs else "-"
        body.append([r.model, r.name, f"{r.bytes_per_token:,}", _human(r.bytes_per_batch), share, r.exact])
    return _format_table(header, body, markdown)


@dataclass(frozen=True)
class LongestRow:
    """The longest sample (tokens) one GPU of ``memory_gib`` holds for a model, unsliced and sliced."""

    model: str
    tensor_parallel: int
    memory_gib: int
    weights_bytes: int
    unsliced: int
    sliced_whole_vocab: int | None  # None: this placement keeps the unsliced head
    sliced_draft_vocab: int | None
    context: int | None


def longest_rows(shape: ModelShape, *, draft_vocab: int, dtype_bytes: int, slice_mib: int) -> list[LongestRow]:
    """Per GPU size and tensor-parallel size: ``max_batch_tokens`` as the server derives it
    (:func:`eagle3_appliance.model.limits.derive_limits`) beside the weights, before (the whole
    logits at once) and after (the head over slices), at D = V and at ``draft_vocab``.

    Presets only (a ``config.json`` names no parameter count). The weights of a tensor-parallel
    model are split evenly; its head is sharded, which the server does not slice yet.
    """
    import torch

    from eagle3_appliance.model.limits import TargetShape, derive_limits
    from eagle3_appliance.settings import Settings

    if shape.parameters is None:
        return []
    target = TargetShape(
        shape.max_position_embeddings,
        shape.vocab_size,
        shape.hidden_size,
        shape.intermediate_size,
        dtype_bytes,
        num_layers=shape.num_hidden_layers or 0,
    )
    cuda = torch.device("cuda")
    rows = []
    for tp in shape.tensor_parallel:
        weights = shape.parameters * dtype_bytes // tp
        for gib in GPU_MEMORY_GIB:
            free = (gib << 30) - weights
            if free <= 0:
                continue
            before = derive_limits(Settings(logits_slice_mib=0), target, device=cuda, free_bytes=free)
            after = derive_limits(Settings(logits_slice_mib=slice_mib), target, device=cuda, free_bytes=free)
            sliced = tp == 1 and after.slice_rows is not None
            rows.append(
                LongestRow(
                    shape.name,
                    tp,
                    gib,
                    weights,
                    before.max_batch_tokens,
                    after.max_batch_tokens if sliced else None,
                    after.tokens_for(target.bytes_per_token(draft_vocab)) if sliced else None,
                    shape.max_position_embeddings,
                )
            )
    return rows


def render_longest(rows: list[LongestRow], *, draft_vocab: int, markdown: bool = False) -> str:
    """The memory table: tokens per sample, and how many times the unsliced figure."""

    def cell(tokens: int | None, before: int) -> str:
        return "unsliced (sharded head)" if tokens is None else f"{tokens:,} ({tokens / before:.1f}x)"

    header = ["model", "GPUs (TP)", "GPU GiB", "weights/GPU", "before", "after, D = V", f"after, D = {draft_vocab:,}"]
    body = [
        [
            r.model,
            str(r.tensor_parallel),
            str(r.memory_gib),
            _human(r.weights_bytes),
            f"{r.unsliced:,}",
            cell(r.sliced_whole_vocab, r.unsliced),
            cell(r.sliced_draft_vocab, r.unsliced),
        ]
        for r in rows
    ]
    return _format_table(header, body, markdown)
