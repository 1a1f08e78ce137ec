"""``python -m benchmarks.wire``: the served rate beside its limits (the bare forward, a raw socket), in one run.

For each case: the appliance end to end with the real client and its default data plane (the
wire on a CPU; transfer and total latency, server peak RSS per request), the same model's
bare forward + softmax + argmax in this process after every served request
(:mod:`benchmarks.bare`; ``served/bare`` is the served rate as a fraction of that limit), a
raw loopback socket moving the same byte count (half its repetitions before the wire run and
half after, so drift in a shared machine's load hits both), and the projection alone. With
``--microbatch CASE``, also several concurrent clients against a server with micro-batching
off and then on. Prints tables (with the load average), then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

__all__ = ["main"]


def _parse(argv: list[str] | None) -> argparse.Namespace:
    from eagle3_appliance.settings import default_cache_dir

    parser = argparse.ArgumentParser(prog="python -m benchmarks.wire", description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="tiny,wide", help="comma-separated: tiny, wide")
    parser.add_argument("--requests", type=int, default=50, help="/generate requests per case")
    parser.add_argument("--warmup", type=int, default=3, help="requests left out of medians and RSS baselines")
    parser.add_argument("--raw-reps", type=int, default=10, help="raw loopback transfers per case")
    parser.add_argument("--cache-dir", type=Path, default=default_cache_dir(), help="where models are generated")
    parser.add_argument("--server-arg", action="append", default=[], help="extra 'serve' argument (repeatable)")
    parser.add_argument("--no-exact", action="store_true", help="skip the bit-exactness check of the first answer")
    parser.add_argument("--data-plane", default="auto", help="the client's data_plane (auto = its default)")
    parser.add_argument("--microbatch", default="", help="also measure micro-batching on this case (e.g. tiny)")
    parser.add_argument("--microbatch-clients", type=int, default=4, help="concurrent clients for --microbatch")
    parser.add_argument("--microbatch-rounds", type=int, default=4, help="requests per client per turn")
    parser.add_argument("--microbatch-repeats", type=int, default=3, help="turns of each mode (off/on alternate)")
    parser.add_argument("--microbatch-wait-ms", type=float, default=20.0, help="server's batching window")
    return parser.parse_args(argv)


def run_case(name: str, args: argparse.Namespace) -> dict[str, Any]:
    from benchmarks.wire.cases import CASES, model_source
    from benchmarks.wire.loopback import loopback_seconds
    from benchmarks.wire.projection import run_projection
    from benchmarks.wire.wire_path import run_wire
    from eagle3_appliance.model.builtin_model import BUILTIN_CONFIG

    case = CASES[name]
    model = model_source(case, args.cache_dir)
    config = case.config() or BUILTIN_CONFIG
    wire = run_wire(
        case,
        model,
        requests=args.requests,
        cache_dir=args.cache_dir,
        server_args=args.server_arg,
        check_exact=not args.no_exact,
        data_plane=args.data_plane,
    )
    summary = wire.summary(args.warmup)
    nbytes = int(summary["payload_bytes"])  # type: ignore[arg-type]
    first = max(1, args.raw_reps // 2)
    raw = loopback_seconds(nbytes, first) + loopback_seconds(nbytes, max(1, args.raw_reps - first))
    raw_gbps = nbytes / statistics.median(raw) / 1e9
    projection = run_projection(case, int(config["vocab_size"]), int(config["hidden_size"]))  # type: ignore[call-overload]
    return {
        "case": name,
        "batch": [case.batch_size, case.seq_len],
        "draft_vocab": case.draft_vocab,
        **summary,
        "raw_gbps": raw_gbps,
        "wire_vs_raw": float(summary["wire_gbps"]) / raw_gbps,  # type: ignore[arg-type]
        "server_hwm_growth_mb": float(summary["server_hwm_mb_end"]) - float(summary["server_hwm_mb_after_warmup"]),  # type: ignore[arg-type]
        **projection,
    }


def _table(rows: list[dict[str, Any]]) -> str:
    columns = [
        ("case", "case", "{}"),
        ("payload MB", "payload_bytes", "{:.1f}"),
        ("served/s", "served_per_s", "{:.2f}"),
        ("bare/s", "bare_per_s", "{:.2f}"),
        ("served/bare", "served_vs_bare", "{:.0%}"),
        ("raw GB/s", "raw_gbps", "{:.2f}"),
        ("wire GB/s", "wire_gbps", "{:.2f}"),
        ("wire/raw", "wire_vs_raw", "{:.0%}"),
        ("latency ms", "latency_ms_median", "{:.0f}"),
        ("transfer ms", "transfer_ms_median", "{:.0f}"),
        ("proj ms", "projection_ms", "{:.0f}"),
        ("ref proj ms", "reference_projection_ms", "{:.0f}"),
        ("HWM MB warm→end", "hwm", "{}"),
        ("exact", "bit_exact", "{}"),
    ]
    cells = []
    for row in rows:
        row = {
            **row,
            "payload_bytes": row["payload_bytes"] / 1e6,
            "hwm": f"{row['server_hwm_mb_after_warmup']:.0f}→{row['server_hwm_mb_end']:.0f}",
            "bit_exact": row["bit_exact"] and row["projection_exact"],
        }
        cells.append([fmt.format(row[key]) for _, key, fmt in columns])
    widths = [max(len(title), *(len(c[i]) for c in cells)) for i, (title, _, _) in enumerate(columns)]
    lines = ["  ".join(title.rjust(w) for (title, _, _), w in zip(columns, widths, strict=True))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(cell, widths, strict=True)) for cell in cells]
    return "\n".join(lines)


def run_microbatch_case(args: argparse.Namespace) -> dict[str, Any]:
    from benchmarks.wire.cases import CASES, model_source
    from benchmarks.wire.microbatch import run_microbatch

    case = CASES[args.microbatch]
    print(f"== micro-batching on {case.name}: {args.microbatch_clients} clients ...", file=sys.stderr, flush=True)
    return run_microbatch(
        case,
        model_source(case, args.cache_dir),
        cache_dir=args.cache_dir,
        clients=args.microbatch_clients,
        rounds=args.microbatch_rounds,
        repeats=args.microbatch_repeats,
        wait_ms=args.microbatch_wait_ms,
    )


def _microbatch_table(mb: dict[str, Any]) -> str:
    lines = [
        f"micro-batching, {mb['case']}: {mb['clients']} clients x {mb['rounds']} requests, wait {mb['wait_ms']} ms"
    ]
    lines.append(f"{'mode':>5}  {'answers/s':>9}  {'max |dprobs|':>12}  {'max |daux|':>10}  {'mask flips':>10}")
    for mode in ("off", "on"):
        lines.append(
            f"{mode:>5}  {mb[f'{mode}_answers_per_s']:9.2f}  {mb[f'{mode}_max_abs_dev_probs']:12.3g}  "
            f"{mb[f'{mode}_max_abs_dev_aux']:10.3g}  {mb[f'{mode}_position_mask_flips']:10d}"
        )
    lines.append(f"gain {mb['gain']:.2f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    import torch

    load_start = os.getloadavg()[0]
    rows = []
    for name in [n.strip() for n in args.cases.split(",") if n.strip()]:
        print(f"== {name}: {args.requests} requests ...", file=sys.stderr, flush=True)
        rows.append(run_case(name, args))
    microbatch = run_microbatch_case(args) if args.microbatch else None
    if rows:
        print(_table(rows))
    if microbatch is not None:
        print(_microbatch_table(microbatch))
    load = [load_start, os.getloadavg()[0]]
    print(f"load average (1 min) {load[0]:.2f} at the start, {load[1]:.2f} at the end; {os.cpu_count()} CPUs")
    meta = {"cpus": os.cpu_count(), "torch": torch.__version__, "requests": args.requests, "warmup": args.warmup}
    meta["load_average"] = load
    print(json.dumps({"bench": "eagle3-wire", **meta, "cases": rows, "microbatch": microbatch}, sort_keys=True))
