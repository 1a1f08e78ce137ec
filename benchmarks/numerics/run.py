"""Numerics of the placement modes: how far a served answer is from the single-device forward.

Usage::

    python -m benchmarks.numerics                                  # TP=2 and a device map, float32 and bfloat16
    python -m benchmarks.numerics --dtype float32 --batches 2      # quicker
    python -m benchmarks.numerics --model /models/Llama-3.1-8B --device cuda --tensor-parallel-size 2

For each dtype it serves the model from real appliance processes on 127.0.0.1 (one with
``--tensor-parallel-size N``, one with ``--device-map`` placing every layer on the device
explicitly), drives them with the real client, and compares every answer with the same model
run whole on one device in this process (the baseline, ``supervision.in_process``): the
largest deviation of the aux states (absolute and as a fraction of their largest magnitude)
and of the probabilities (absolute, and relative where the reference is >= 1e-4), the
position-mask flips, and the largest reference top-2 logit gap at a flip (a near-tie). The
last column checks the documented tolerance (:data:`eagle3_appliance.model.numerics.TP_TOLERANCES`);
the device map must be bit-exact. The default model is a Llama made from a seed (hidden 128,
8 layers, vocabulary 8192). Exit code 1 when a row is out of its bound.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from eagle3_appliance.core.inputs import GenerateInputs, VocabMapping
from eagle3_appliance.launch import ServerProcess
from eagle3_appliance.model.builtin_model import BUILTIN_CONFIG, ensure_builtin_model
from eagle3_appliance.model.loading import load_target
from eagle3_appliance.model.numerics import Deviation, measure, reference_and_tie_gaps, tolerance_for
from eagle3_appliance.progress import Progress, track
from eagle3_appliance.settings import Settings
from eagle3_client import RemoteEagle3TargetModel
from eagle3_client.synthetic import random_batch, vocab_mapping

__all__ = ["TP_TEST_CONFIG", "main"]

# The generated Llama of the tensor-parallel tests and of this benchmark.
TP_TEST_CONFIG: dict[str, object] = {
    **BUILTIN_CONFIG,
    "hidden_size": 128,
    "intermediate_size": 256,
    "vocab_size": 8192,
}


def _served(url: str, mapping: VocabMapping, batches: list, references: list) -> list[tuple[Deviation, float]]:
    """Per batch: the deviation from its ``(expected, tie gaps)`` reference, and the largest top-2 gap at a flip."""
    rows = []
    with RemoteEagle3TargetModel.from_urls([url], device="cpu", timeout=600) as remote:
        remote.set_vocab_mapping(mapping.selected_token_ids, mapping.selected_token_mask)
        pairs = zip(batches, references, strict=True)
        for inputs, (expected, gaps) in track(pairs, Progress(url, len(batches), unit="batches")):
            got = remote.generate_batch(*inputs)
            deviation = measure(got, expected, gaps, float("inf"))
            flips = (got.position_mask.cpu() != expected["position_mask"].cpu()).reshape(gaps.shape)
            rows.append((deviation, float(gaps.cpu()[flips].max()) if bool(flips.any()) else 0.0))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="", help="a model folder; default: the generated Llama")
    parser.add_argument("--dtype", action="append", help="float32, bfloat16 (repeatable; default both)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tensor-parallel-size", type=int, default=2)
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--draft-vocab", type=int, default=2048)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="eagle3-numerics-"))
    model = args.model or str(ensure_builtin_model(work, TP_TEST_CONFIG))
    print(f"== numerics of the placement modes: {model}, {args.batches} x [{args.batch_size}, {args.seq_len}]")
    print(
        "| dtype | mode | tokens | aux max abs | aux max abs / max |aux| | probs max abs | probs max rel (p >= 1e-4) "
        "| mask flips | largest top-2 gap at a flip | within bound |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    failed = False
    for dtype in args.dtype or ["float32", "bfloat16"]:
        common = ["--model", model, "--dtype", dtype, "--device", args.device, "--cache-dir", str(work)]
        reference = load_target(Settings(model=model, dtype=dtype, device=args.device, cache_dir=work))
        vocab = reference.logits_size
        mapping = VocabMapping(*vocab_mapping(vocab, min(args.draft_vocab, vocab), seed=1))
        batches = [
            random_batch(reference.vocab_size, args.batch_size, args.seq_len, seed=i) for i in range(args.batches)
        ]
        references = [reference_and_tie_gaps(reference, GenerateInputs(*inputs), mapping) for inputs in batches]
        explicit_map = json.dumps({"": args.device})
        modes = [
            (f"tp={args.tensor_parallel_size}", ["--tensor-parallel-size", str(args.tensor_parallel_size)]),
            ("device_map", ["--device-map", explicit_map]),
        ]
        for mode, extra in modes:
            log = work / f"server-{dtype}-{mode}.log"
            with ServerProcess([*common, *extra], log_path=log, startup_timeout=600) as server:
                rows = _served(server.url, mapping, batches, references)
            worst = Deviation(
                aux_abs=max(r.aux_abs for r, _ in rows),
                aux_rel=max(r.aux_rel for r, _ in rows),
                probs_abs=max(r.probs_abs for r, _ in rows),
                probs_rel=max(r.probs_rel for r, _ in rows),
                mask_flips=sum(r.mask_flips for r, _ in rows),
                flips_beyond_ties=0,
                positions=sum(r.positions for r, _ in rows),
                exact_rest=all(r.exact_rest for r, _ in rows),
            )
            gap = max(g for _, g in rows)
            if mode == "device_map":
                ok = worst.aux_abs == 0 and worst.probs_abs == 0 and worst.mask_flips == 0 and worst.exact_rest
                bound = "bit-exact: " + ("yes" if ok else "NO")
            else:
                tolerance = tolerance_for(getattr(torch, dtype))
                ok = worst.within(tolerance) and gap <= tolerance.tie_gap
                bound = f"aux {tolerance.aux_rel:g}, probs {tolerance.probs_abs:g}, gap {tolerance.tie_gap:g}: " + (
                    "yes" if ok else "NO"
                )
            failed |= not ok
            print(
                f"| {dtype} | {mode} | {worst.positions} | {worst.aux_abs:.2g} | {worst.aux_rel:.2g} | "
                f"{worst.probs_abs:.2g} | {worst.probs_rel:.2g} | {worst.mask_flips} of {worst.positions} | "
                f"{gap:.3g} | {bound} |",
                flush=True,
            )
    return 1 if failed else 0
