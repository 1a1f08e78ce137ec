"""``python -m benchmarks.long``: long samples served with the LM head over the whole sequence and over slices.

The wide checkpoint (the built-in Llama with a 32,000-entry vocabulary, hidden 64, MLP 256,
float32, context 8192 in its config, raised with ``--max-seq-len``) is served twice with the
default memory limits, by two servers side by side: ``before`` with ``--logits-slice-mib 0``
(the whole ``[1,T,V]`` logits at once, as upstream and this server did), ``after`` with the
default slices. Each server answers one ``B = 1`` request per length in ``--lengths``,
ascending, over the wire, through the real client; the servers take turns, in an order that
flips every length. Per mode and length it prints the server's peak resident memory beyond
what it held once loaded (``VmHWM`` less the ``VmRSS`` before the first request; the buffer
pool keeps the blocks of shorter answers before it, so a peak includes them), answers per
second, and served/bare: the rate against this process's own bare forward + whole-vocabulary
softmax + argmax at that length (:mod:`benchmarks.bare`), timed once the servers are gone (its
softmax would otherwise share the memory with theirs). A length past a server's
``max_batch_tokens`` is refused with a 422; the table says so. Every ``after`` answer is
compared bit for bit with the ``before`` one of the same length, and the shortest with this
process's in-process reference. Then one JSON line. ``--bare-up-to`` skips the bare forward
of longer samples (at 65,536 tokens its float32 logits and softmax need 17 GB).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["WIDE_CONFIG_OVERRIDE", "main"]

# The wide checkpoint: the built-in Llama (hidden 64, 8 layers) with a 32k vocabulary.
WIDE_CONFIG_OVERRIDE: dict[str, object] = {
    "vocab_size": 32000,
    "intermediate_size": 256,
    "max_position_embeddings": 8192,
}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    from eagle3_appliance.settings import default_cache_dir

    parser = argparse.ArgumentParser(prog="python -m benchmarks.long", description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="2048", help="comma-separated sequence lengths, e.g. 8192,32768,65536")
    parser.add_argument("--draft-vocab", type=int, default=8192, help="draft vocabulary D of the answers")
    parser.add_argument("--modes", default="before,after", help="before (--logits-slice-mib 0), after (default)")
    parser.add_argument("--no-bare", action="store_true", help="skip the bare forward (saves its time and memory)")
    parser.add_argument(
        "--bare-up-to", type=int, default=0, help="time the bare forward only up to this length (0: every length)"
    )
    parser.add_argument("--cache-dir", type=Path, default=default_cache_dir(), help="where the checkpoint is made")
    return parser.parse_args(argv)


def _memory_kib(pid: int) -> dict[str, int]:
    """``VmHWM`` and ``VmRSS`` of a process, KiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmHWM", "VmRSS"):
            fields[name] = int(value.split()[0])
    return fields


def _digest(batch: Any) -> str:
    """One hash over the answer's tensors: the bit-exactness check without keeping answers of several GB."""
    import torch

    h = hashlib.sha256()
    for key in ("aux_hidden_states", "target_probs", "position_mask", "input_ids", "loss_mask"):
        tensor = getattr(batch, key).contiguous()
        h.update(key.encode())
        h.update(tensor.view(-1).view(dtype=torch.uint8).numpy().tobytes())
    return h.hexdigest()


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    import torch

    from benchmarks.bare import bare_model, bare_step, time_once
    from eagle3_appliance.core.inputs import GenerateInputs, VocabMapping
    from eagle3_appliance.launch import ServerProcess
    from eagle3_appliance.model.builtin_model import BUILTIN_CONFIG, ensure_builtin_model
    from eagle3_appliance.model.loading import load_target
    from eagle3_appliance.model.supervision import in_process, supervision_equal
    from eagle3_appliance.settings import Settings
    from eagle3_client import RemoteEagle3TargetModel, TargetHTTPError
    from eagle3_client.synthetic import random_batch, vocab_mapping

    lengths = sorted(int(x) for x in args.lengths.split(","))
    modes = [m.strip() for m in args.modes.split(",")]
    model_dir = ensure_builtin_model(args.cache_dir, config={**BUILTIN_CONFIG, **WIDE_CONFIG_OVERRIDE})
    settings = Settings(model=str(model_dir), max_seq_len=max(lengths))
    mapping = vocab_mapping(32000, args.draft_vocab, seed=1)
    batches = {t: random_batch(32000, 1, t, seed=t) for t in lengths}

    results: dict[str, dict[int, dict[str, Any]]] = {mode: {} for mode in modes}
    digests: dict[str, dict[int, str]] = {mode: {} for mode in modes}
    exact_reference: bool | None = None
    with contextlib.ExitStack() as stack:
        remotes, pids, baselines, limits = {}, {}, {}, {}
        for mode in modes:
            server_args = ["--model", str(model_dir), "--max-seq-len", str(max(lengths))]
            server_args += ["--logits-slice-mib", "0"] if mode == "before" else []
            server = stack.enter_context(ServerProcess(server_args, startup_timeout=600))
            remote = stack.enter_context(
                RemoteEagle3TargetModel.from_urls([server.url], data_plane="wire", timeout=3600, max_retries=0)
            )
            remote.set_vocab_mapping(*mapping)
            served = remote.served_model()
            assert server.proc is not None
            remotes[mode], pids[mode] = remote, server.proc.pid
            baselines[mode] = _memory_kib(server.proc.pid)["VmRSS"]
            limits[mode] = served.max_batch_tokens if served else None
        for i, seq_len in enumerate(lengths):
            # The servers take turns (the order flips every length), so a shared machine's load hits both.
            for mode in modes if i % 2 == 0 else modes[::-1]:
                print(f"== {mode}: T = {seq_len} ...", file=sys.stderr, flush=True)
                row: dict[str, Any] = {"max_batch_tokens": limits[mode]}
                results[mode][seq_len] = row
                start = time.perf_counter()
                try:
                    batch = remotes[mode].generate_batch(*batches[seq_len])
                except TargetHTTPError as exc:
                    row["refused"] = f"{exc.status}"
                    continue
                row["seconds"] = time.perf_counter() - start
                row["peak_mib"] = (_memory_kib(pids[mode])["VmHWM"] - baselines[mode]) / 1024
                digests[mode][seq_len] = _digest(batch)
                if exact_reference is None and mode == modes[-1]:
                    target = load_target(settings)
                    reference = in_process(target, GenerateInputs(*batches[seq_len]), VocabMapping(*mapping))
                    exact_reference = supervision_equal(batch, reference)
                    del target, reference
                del batch
    # The bare forward once the servers are gone, so that its whole-vocabulary softmax never
    # shares the machine's memory with a server's.
    bare_seconds = {}
    if not args.no_bare:
        model = bare_model(settings)
        for seq_len in (t for t in lengths if not args.bare_up_to or t <= args.bare_up_to):
            print(f"== bare: T = {seq_len} ...", file=sys.stderr, flush=True)
            ids, mask, _ = batches[seq_len]
            bare_seconds[seq_len] = time_once(bare_step(model, ids, mask))
        del model
    for mode in modes:
        for seq_len, row in results[mode].items():
            if seq_len in bare_seconds and "seconds" in row:
                row["bare_seconds"] = bare_seconds[seq_len]

    exact_modes = (
        all(digests[modes[-1]][t] == d for t, d in digests[modes[0]].items() if t in digests[modes[-1]])
        if len(modes) > 1
        else None
    )
    print(
        f"long samples: wide checkpoint (V 32000, H 64, float32), B = 1, D = {args.draft_vocab}, wire, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, torch {torch.__version__}"
    )
    header = ("mode", "T", "max_batch_tokens", "peak MiB beyond weights", "answers/s", "served/bare")
    widths = (6, 6, 16, 23, 9, 11)
    print("  ".join(f"{h:>{w}}" for h, w in zip(header, widths, strict=True)))
    for mode in modes:
        for seq_len in lengths:
            row = results[mode][seq_len]
            if "refused" in row:
                cells = [mode, str(seq_len), f"{row['max_batch_tokens']:,}", f"refused ({row['refused']})", "-", "-"]
            else:
                ratio = f"{row['bare_seconds'] / row['seconds']:.2f}" if "bare_seconds" in row else "-"
                cells = [
                    mode,
                    str(seq_len),
                    f"{row['max_batch_tokens']:,}",
                    f"{row['peak_mib']:,.0f}",
                    f"{1 / row['seconds']:.3f}",
                    ratio,
                ]
            print("  ".join(f"{c:>{w}}" for c, w in zip(cells, widths, strict=True)))
    print(f"answers bit-exact, sliced vs unsliced: {exact_modes}; vs the in-process reference: {exact_reference}")
    print(
        json.dumps(
            {
                "bench": "eagle3-long",
                "cpus": os.cpu_count(),
                "load_average": os.getloadavg()[0],
                "torch": torch.__version__,
                "draft_vocab": args.draft_vocab,
                "results": results,
                "bit_exact_modes": exact_modes,
                "bit_exact_reference": exact_reference,
            },
            sort_keys=True,
        )
    )
    if exact_modes is False or exact_reference is False:
        raise SystemExit(1)
