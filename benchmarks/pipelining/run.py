"""``python -m benchmarks.pipelining``: what a second request in flight buys one server, in one run.

One appliance process serves a case of :mod:`benchmarks.wire.cases` (``wide`` by default: a
~275 MB answer per batch); the real client fetches ``--requests`` answers with
``max_in_flight_per_server`` 1 and then 2 (alternating ``--repeats`` times, so a shared
machine's drift hits both), and the same model computes the same supervision in this process
before and after, two ways: :func:`eagle3_appliance.model.supervision.in_process` (the reference: the
rate a plain co-located target gives) and the server's own compute step (the forward and the
projection into reused memory, what one server can do per second at best). Prints served
answers/s per mode, each as a fraction of the in-process rates, then one JSON line. The first
served answer of each mode is checked bit for bit against the in-process one.

The limit beside every figure: the same model's bare forward + softmax + argmax
(:mod:`benchmarks.bare`, no hooks, no projection, no transfer) is timed in this process in
every round, alternating with the served measurements, and each served rate is printed as a
fraction of it (``of bare``).

With one request in flight a server idles while its answer travels and the client decodes;
with two, its next forward runs meanwhile, so answers/s approaches the forward rate. That
needs the forward and the transfer to run on different resources (a GPU and the network or
PCIe); on a CPU-only machine both share the cores, and the gain is what is left over.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["main"]


def _parse(argv: list[str] | None) -> argparse.Namespace:
    from eagle3_appliance.settings import default_cache_dir

    parser = argparse.ArgumentParser(prog="python -m benchmarks.pipelining", description=__doc__.splitlines()[0])
    parser.add_argument("--case", default="wide", help="a case of benchmarks.wire.cases: tiny or wide")
    parser.add_argument("--requests", type=int, default=8, help="answers per measurement")
    parser.add_argument("--repeats", type=int, default=2, help="measurements per mode (modes alternate)")
    parser.add_argument("--data-plane", default="auto", help="auto (the default), gloo or wire (nccl needs two GPUs)")
    parser.add_argument("--device", default="auto", help="the server's and the reference's device")
    parser.add_argument("--cache-dir", type=Path, default=default_cache_dir(), help="where models are generated")
    return parser.parse_args(argv)


def _in_process_rate(target: Any, inputs: Any, mapping: Any, requests: int) -> float:
    """Answers/s of the co-located computation (forward, projection, on the target's device)."""
    import torch

    from benchmarks.bare import calls_per_second
    from eagle3_appliance.model.supervision import in_process

    def once() -> None:
        answer = in_process(target, inputs, mapping)
        if target.device.type == "cuda":
            torch.cuda.synchronize(target.device)
        del answer

    in_process(target, inputs, mapping)  # warm-up
    return calls_per_second(once, requests)


def _server_compute_rate(target: Any, inputs: Any, mapping: Any, requests: int) -> float:
    """Answers/s of the server's compute step alone: forward and projection into reused memory, host copy."""
    import torch

    from benchmarks.bare import calls_per_second
    from eagle3_appliance.dataplanes.buffers import ServerBuffers
    from eagle3_appliance.model import supervision
    from eagle3_client.encodings import PROBS

    buffers = ServerBuffers(target.device, 4 << 30)
    inputs, mapping = inputs.to(target.device), mapping.to(target.device)

    def once() -> None:
        with torch.no_grad():
            alloc = buffers.device_alloc()
            out = target.forward(inputs.input_ids, inputs.attention_mask, alloc=alloc)
            answer = supervision.encode(PROBS, out, inputs, mapping, alloc=alloc)
            del out
            buffers.to_host(answer)

    once()  # warm-up
    return calls_per_second(once, requests)


def _served_rate(remote: Any, batch: Any, requests: int) -> float:
    """Answers/s with ``requests`` batches handed to the client at once (it keeps its in-flight limit)."""
    start = time.perf_counter()
    handles = [remote.generate_batch_async(*batch) for _ in range(requests)]
    for handle in handles:
        handle.result(timeout=600)
    return requests / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    import torch

    from benchmarks.bare import bare_model, bare_step, calls_per_second
    from benchmarks.wire.cases import CASES, model_source
    from eagle3_appliance.core.inputs import GenerateInputs, VocabMapping
    from eagle3_appliance.launch import ServerProcess
    from eagle3_appliance.model.loading import load_target
    from eagle3_appliance.model.supervision import in_process, supervision_equal
    from eagle3_appliance.settings import Device, Settings
    from eagle3_client import RemoteEagle3TargetModel
    from eagle3_client.synthetic import random_batch, vocab_mapping

    case = CASES[args.case]
    model = model_source(case, args.cache_dir)
    settings = Settings(model=model, cache_dir=args.cache_dir, device=Device(args.device))
    print(f"== {case.name}: loading {model} in this process for the reference ...", file=sys.stderr, flush=True)
    target = load_target(settings)
    mapping = VocabMapping(*vocab_mapping(target.logits_size, case.draft_vocab, seed=1))
    batch = random_batch(target.vocab_size, case.batch_size, case.seq_len, seed=2)
    inputs = GenerateInputs(*batch)
    reference = {k: v.cpu() for k, v in in_process(target, inputs, mapping).items()}
    bare = bare_step(bare_model(settings), batch[0], batch[1])
    bare()  # warm-up

    server_args = ["--model", model, "--cache-dir", str(args.cache_dir), "--device", args.device]
    server_args += ["--max-seq-len", str(case.seq_len), "--max-batch-tokens", str(case.batch_size * case.seq_len)]
    server_args += ["--max-body-bytes", str(64 << 20)]
    rates: dict[str, list[float]] = {"bare": [], "in_process": [], "server_compute": [], "1": [], "2": []}
    load_start = os.getloadavg()[0]
    tiers: dict[str, str] = {}
    exact = False
    rates["in_process"].append(_in_process_rate(target, inputs, mapping, args.requests))
    rates["server_compute"].append(_server_compute_rate(target, inputs, mapping, args.requests))
    with ServerProcess(server_args, startup_timeout=600) as server:
        clients = {
            k: RemoteEagle3TargetModel.from_urls(
                [server.url], max_in_flight_per_server=int(k), data_plane=args.data_plane, timeout=600
            )
            for k in ("1", "2")
        }
        try:
            checks = []
            for remote in clients.values():
                remote.set_vocab_mapping(mapping.selected_token_ids, mapping.selected_token_mask)
                first = remote.generate_batch(*batch)  # warm-up (and the group's rendezvous)
                checks.append(supervision_equal(first, reference))
                del first
            exact = all(checks)
            for repeat in range(args.repeats):
                for k in ("bare", "1", "2") if repeat % 2 == 0 else ("2", "1", "bare"):
                    print(f"== {k}, round {repeat + 1} ...", file=sys.stderr, flush=True)
                    if k == "bare":
                        rates[k].append(calls_per_second(bare, args.requests))
                        continue
                    rates[k].append(_served_rate(clients[k], batch, args.requests))
                    tiers[k] = clients[k].transport_stats()[0]["tier"]
        finally:
            for remote in clients.values():
                remote.close()
    rates["server_compute"].append(_server_compute_rate(target, inputs, mapping, args.requests))
    rates["in_process"].append(_in_process_rate(target, inputs, mapping, args.requests))

    load = [load_start, os.getloadavg()[0]]
    medians = {k: statistics.median(v) for k, v in rates.items()}
    limit, base, ceiling = medians["bare"], medians["in_process"], medians["server_compute"]
    shape = f"B={case.batch_size} T={case.seq_len} D={case.draft_vocab}"
    print(f"pipelining, {case.name}: {shape}, {args.requests} answers per measurement")
    print(f"{'mode':>22}  {'answers/s':>9}  {'of bare':>7}  {'of in-process':>13}  {'of server compute':>17}  tier")
    rows = [("bare forward (limit)", "bare", "-"), ("in-process reference", "in_process", "-")]
    rows += [("server compute step", "server_compute", "-"), ("1 in flight", "1", tiers.get("1", "?"))]
    rows.append(("2 in flight", "2", tiers.get("2", "?")))
    for title, key, tier in rows:
        rate = medians[key]
        print(f"{title:>22}  {rate:9.3f}  {rate / limit:7.0%}  {rate / base:13.0%}  {rate / ceiling:17.0%}  {tier}")
    print(f"2 in flight / 1 in flight: {medians['2'] / medians['1']:.2f}")
    print(f"bit-exact: {'yes' if exact else 'NO'}")
    print(f"load average (1 min) {load[0]:.2f} at the start, {load[1]:.2f} at the end; {os.cpu_count()} CPUs")
    meta = {"cpus": os.cpu_count(), "torch": torch.__version__, "device": str(target.device), "load_average": load}
    print(
        json.dumps(
            {
                "bench": "eagle3-pipelining",
                "case": case.name,
                **meta,
                "requests": args.requests,
                "rates": rates,
                "medians": medians,
                "tiers": tiers,
                "bit_exact": exact,
            },
            sort_keys=True,
        )
    )
