"""``python -m benchmarks.packing``: packed rows against padded batches of the same documents, in one run.

One appliance process serves the built-in model (or ``--model``). ``--documents`` chat-like
documents are drawn once (lengths from a log-normal, token ids and loss masks random), then sent
through the real client two ways:

* padded: ``--batch-size`` documents a request, right-padded to the longest of them (the
  recipe's default collation, ``padding="longest"``);
* packed: the same documents in order, first fit into rows of ``--packed-size`` tokens
  (the recipe's ``packed_sequence_size``), ``--rows`` rows a request.

The modes alternate ``--repeats`` times (so a shared machine's drift hits both). Prints, per
mode, requests, tokens computed, useful (non-pad) tokens, the pad fraction and the useful
tokens per second (median over repeats), then one JSON line. The first packed answer is
checked bit for bit against the same packed batch computed in this process.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["main"]


def _parse(argv: list[str] | None) -> argparse.Namespace:
    from eagle3_appliance.settings import default_cache_dir

    parser = argparse.ArgumentParser(prog="python -m benchmarks.packing", description=__doc__.splitlines()[0])
    parser.add_argument("--documents", type=int, default=64, help="documents sent in each mode and repeat")
    parser.add_argument("--median-length", type=float, default=48.0, help="median document length (log-normal)")
    parser.add_argument("--sigma", type=float, default=0.8, help="spread of the log-normal lengths")
    parser.add_argument("--packed-size", type=int, default=256, help="row width of the packed mode")
    parser.add_argument("--batch-size", type=int, default=4, help="documents per padded request")
    parser.add_argument("--rows", type=int, default=1, help="packed rows per request")
    parser.add_argument("--repeats", type=int, default=2, help="measurements per mode (modes alternate)")
    parser.add_argument("--data-plane", default="auto", help="auto, gloo or wire")
    parser.add_argument("--model", default=None, help="a model folder (default: the built-in model)")
    parser.add_argument("--device", default="auto", help="the server's and the reference's device")
    parser.add_argument("--cache-dir", type=Path, default=default_cache_dir(), help="where models are generated")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def _documents(args: argparse.Namespace, vocab_size: int) -> list[tuple[list[int], list[int]]]:
    """(token ids, loss mask) per document; a quarter of each is prompt (loss 0)."""
    rng = random.Random(args.seed)
    docs = []
    for _ in range(args.documents):
        length = min(max(1, round(rng.lognormvariate(math.log(args.median_length), args.sigma))), args.packed_size)
        prompt = length // 4
        docs.append(([rng.randrange(vocab_size) for _ in range(length)], [0] * prompt + [1] * (length - prompt)))
    return docs


def _layout(docs: list[tuple[list[int], list[int]]], rows: list[list[int]], width: int) -> dict[str, Any]:
    """A batch of ``rows`` (indices into ``docs``) of ``width`` tokens, laid out like the recipe's packer."""
    from eagle3_client.synthetic import packed_batch

    lengths = [[len(docs[i][0]) for i in row] for row in rows]
    batch = packed_batch(1, lengths, width, seed=0)  # the layout; ids and loss masks are filled in below
    for r, row in enumerate(rows):
        start = 0
        for i in row:
            ids, loss = docs[i]
            batch["input_ids"][r, start : start + len(ids)] = batch["input_ids"].new_tensor(ids)
            batch["loss_mask"][r, start : start + len(ids)] = batch["loss_mask"].new_tensor(loss)
            start += len(ids)
    return batch


def _requests(docs: list[tuple[list[int], list[int]]], args: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    """Both modes' request batches over the same documents (padded ones without the packing keys)."""
    from eagle3_client.synthetic import pack_rows

    padded = []
    for start in range(0, len(docs), args.batch_size):
        group = list(range(start, min(start + args.batch_size, len(docs))))
        batch = _layout(docs, [[i] for i in group], max(len(docs[i][0]) for i in group))
        padded.append({k: batch[k] for k in ("input_ids", "attention_mask", "loss_mask")})
    rows: list[list[int]] = []
    index = 0
    for row in pack_rows([len(ids) for ids, _ in docs], args.packed_size):
        rows.append(list(range(index, index + len(row))))
        index += len(row)
    packed = [_layout(docs, rows[i : i + args.rows], args.packed_size) for i in range(0, len(rows), args.rows)]
    return {"padded": padded, "packed": packed}


def _served_seconds(remote: Any, batches: list[dict[str, Any]]) -> float:
    """Seconds to fetch every batch, handed to the client at once (it keeps its in-flight limit)."""
    start = time.perf_counter()
    handles = [remote.generate_batch_async(**batch) for batch in batches]
    for handle in handles:
        handle.result(timeout=600)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    import torch

    from eagle3_appliance.core.inputs import GenerateInputs, Packing, VocabMapping
    from eagle3_appliance.launch import ServerProcess
    from eagle3_appliance.model.loading import load_target
    from eagle3_appliance.model.supervision import in_process, supervision_equal
    from eagle3_appliance.settings import Device, Settings
    from eagle3_client import RemoteEagle3TargetModel
    from eagle3_client.synthetic import vocab_mapping

    settings = Settings(
        cache_dir=args.cache_dir, device=Device(args.device), **({"model": args.model} if args.model else {})
    )
    print("== loading the model in this process for the check ...", file=sys.stderr, flush=True)
    target = load_target(settings)
    mapping = VocabMapping(*vocab_mapping(target.logits_size, min(256, target.logits_size), seed=1))
    docs = _documents(args, target.vocab_size)
    requests = _requests(docs, args)
    useful = sum(len(ids) for ids, _ in docs)
    computed = {mode: sum(b["input_ids"].numel() for b in batches) for mode, batches in requests.items()}

    first = requests["packed"][0]
    packing = Packing(first["position_ids"], first["seq_lens"], first["doc_remaining"])
    reference = in_process(
        target, GenerateInputs(first["input_ids"], first["attention_mask"], first["loss_mask"], packing), mapping
    )
    server_args = ["--cache-dir", str(args.cache_dir), "--device", args.device]
    server_args += ["--model", args.model] if args.model else []
    seconds: dict[str, list[float]] = {"padded": [], "packed": []}
    with ServerProcess(server_args, startup_timeout=600) as server:
        with RemoteEagle3TargetModel.from_urls([server.url], data_plane=args.data_plane, timeout=600) as remote:
            remote.set_vocab_mapping(mapping.selected_token_ids, mapping.selected_token_mask)
            exact = supervision_equal(remote.generate_batch(**first), reference)  # also the warm-up
            remote.generate_batch(**requests["padded"][0])
            for repeat in range(args.repeats):
                for mode in ("padded", "packed") if repeat % 2 == 0 else ("packed", "padded"):
                    print(f"== {mode}, round {repeat + 1} ...", file=sys.stderr, flush=True)
                    seconds[mode].append(_served_seconds(remote, requests[mode]))
            tier = remote.transport_stats()[0]["tier"]

    rates = {mode: useful / statistics.median(s) for mode, s in seconds.items()}
    print(
        f"packing: {args.documents} documents (median {args.median_length:g} tokens), "
        f"padded {args.batch_size} a request vs packed rows of {args.packed_size} ({args.rows} a request), {tier}"
    )
    header = ("mode", "requests", "tokens", "useful", "pad", "useful tok/s", "vs padded")
    print("  ".join(f"{h:>{w}}" for h, w in zip(header, (7, 8, 8, 8, 5, 12, 9), strict=True)))
    for mode in ("padded", "packed"):
        pad = 1 - useful / computed[mode]
        print(
            f"{mode:>7}  {len(requests[mode]):8d}  {computed[mode]:8d}  {useful:8d}  {pad:5.0%}  "
            f"{rates[mode]:12,.0f}  {rates[mode] / rates['padded']:9.2f}x"
        )
    print(f"packed answer bit-exact with the in-process packed forward: {'yes' if exact else 'NO'}")
    meta = {"cpus": os.cpu_count(), "torch": torch.__version__, "device": str(target.device), "tier": tier}
    print(
        json.dumps(
            {
                "bench": "eagle3-packing",
                **meta,
                "documents": args.documents,
                "useful_tokens": useful,
                "computed_tokens": computed,
                "seconds": seconds,
                "useful_tokens_per_second": rates,
                "bit_exact": exact,
            },
            sort_keys=True,
        )
    )
    if not exact:
        raise SystemExit(1)
