"""GPU check of serving speed: the served rate against the bare forward of the same bf16 model.

Run on a GPU machine (not collected by pytest; about 2-4 minutes on one GPU)::

    python tests/gpu/check_serving_speed.py [--requests 12] [--rounds 3] [--hidden 1024] [--layers 8]

A generated bf16 Llama (``--hidden``, ``--layers``, a 32k vocabulary; or ``--model`` for a
checkpoint) is served by a real appliance process on GPU 0. This process fetches answers with
the real client onto a CUDA trainer device, one ``generate_batch`` at a time as a trainer does,
per tier, and in every round also times the same model's bare forward + softmax + argmax here
(:mod:`benchmarks.bare`), alternating, so that the ratio is taken under the same conditions.

* ``wire``: the HTTP body, received into host memory and copied to the trainer's GPU.
* ``nccl``: needs two visible GPUs (NCCL refuses two ranks on one GPU): the server runs on
  GPU 0 and this process receives on GPU 1. With one GPU it is reported as skipped.
* ``auto``: the client's default options, whatever tier they pick (reported); with one GPU it
  would pick NCCL for a server and trainer on the same GPU, so it is skipped there.

Every tier's first answer is compared bit for bit with the in-process reference
(:func:`eagle3_appliance.model.supervision.in_process`); a non-exact answer fails the check.
Prints one line per tier, then one JSON line; exit code 1 on a non-exact answer, 0 otherwise.
No GPU visible: says so and exits 0. ``--device cpu`` runs the same logic on the CPU (wire and
auto only; a dry run of this script, not a measurement to quote).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # benchmarks/ lives in the checkout, not in the wheel

from benchmarks.bare import bare_model, bare_step, calls_per_second  # noqa: E402
from eagle3_appliance.core.inputs import GenerateInputs, VocabMapping  # noqa: E402
from eagle3_appliance.launch import ServerProcess  # noqa: E402
from eagle3_appliance.model.builtin_model import BUILTIN_CONFIG, ensure_builtin_model  # noqa: E402
from eagle3_appliance.model.loading import load_target  # noqa: E402
from eagle3_appliance.model.supervision import in_process, supervision_equal  # noqa: E402
from eagle3_appliance.settings import Device, Dtype, Settings  # noqa: E402
from eagle3_client import RemoteEagle3TargetModel  # noqa: E402
from eagle3_client.synthetic import random_batch, vocab_mapping  # noqa: E402

VOCAB = 32768


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="", help="a checkpoint folder (default: a generated bf16 Llama)")
    parser.add_argument("--hidden", type=int, default=1024, help="hidden size of the generated model")
    parser.add_argument("--layers", type=int, default=8, help="decoder layers of the generated model (>= 7)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--draft-vocab", type=int, default=VOCAB)
    parser.add_argument("--requests", type=int, default=12, help="answers per tier per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; each times the bare forward and every tier")
    parser.add_argument("--device", default="cuda", help="cuda, or cpu for a dry run of the logic")
    parser.add_argument("--cache-dir", type=Path, default=None, help="where the generated model goes")
    return parser.parse_args()


def _model(args: argparse.Namespace, cache: Path) -> str:
    if args.model:
        return str(args.model)
    heads = max(1, args.hidden // 128)
    config = {
        **BUILTIN_CONFIG,
        "hidden_size": args.hidden,
        "intermediate_size": args.hidden * 3,
        "num_hidden_layers": args.layers,
        "num_attention_heads": heads,
        "num_key_value_heads": max(1, heads // 4),
        "vocab_size": VOCAB,
    }
    return str(ensure_builtin_model(cache, config=config))


def _served_rate(remote: RemoteEagle3TargetModel, batch: Any, requests: int) -> float:
    return calls_per_second(lambda: remote.generate_batch(*batch), requests)


def main() -> int:
    args = _parse()
    cuda = args.device == "cuda"
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    print(f"== serving-speed check: {count} GPU(s) visible, torch {torch.__version__}", flush=True)
    if cuda and count == 0:
        print("no GPU visible: nothing to measure here (python -m benchmarks.wire measures the CPU)")
        return 0
    cache = args.cache_dir or Path(tempfile.mkdtemp(prefix="eagle3-speed-check-"))
    model = _model(args, cache)
    device = Device.cuda if cuda else Device.cpu
    settings = Settings(model=model, cache_dir=cache, device=device, dtype=Dtype.bfloat16)
    target = load_target(settings)
    mapping = VocabMapping(*vocab_mapping(target.logits_size, min(args.draft_vocab, target.logits_size), seed=1))
    batch = random_batch(target.vocab_size, args.batch_size, args.seq_len, seed=2)
    reference = {k: v.cpu() for k, v in in_process(target, GenerateInputs(*batch), mapping).items()}
    del target
    bare = bare_step(bare_model(settings), batch[0], batch[1])
    bare()  # warm-up (kernels, allocator)

    tiers = {"wire": "wire"}
    skipped: dict[str, str] = {}
    if cuda and count >= 2:
        tiers.update(nccl="nccl", auto="auto")
    elif cuda:
        skipped["nccl"] = "needs two visible GPUs (NCCL refuses two ranks on one GPU)"
        skipped["auto"] = "would pick nccl (both ends on CUDA), which one GPU cannot pair"
    else:
        tiers["auto"] = "auto"
        skipped["nccl"] = "CPU dry run"
    trainer = ("cuda:1" if count >= 2 else "cuda:0") if cuda else "cpu"
    server_args = ["--model", model, "--cache-dir", str(cache), "--device", device.value, "--dtype", "bfloat16"]
    server_args += ["--max-seq-len", str(args.seq_len), "--max-batch-tokens", str(args.batch_size * args.seq_len)]
    env = {"CUDA_VISIBLE_DEVICES": "0"} if cuda and count >= 2 else {}
    rates: dict[str, list[float]] = {"bare": [], **{name: [] for name in tiers}}
    results: dict[str, dict[str, Any]] = {}
    with ServerProcess(server_args, env=env, log_path=cache / "server.log", startup_timeout=600) as server:
        clients = {
            name: RemoteEagle3TargetModel.from_urls([server.url], device=trainer, data_plane=tier, timeout=600)
            for name, tier in tiers.items()
        }
        try:
            for name, remote in clients.items():
                remote.set_vocab_mapping(mapping.selected_token_ids, mapping.selected_token_mask)
                first = remote.generate_batch(*batch)  # warm-up, the group's rendezvous, the exactness check
                on_trainer = all(getattr(first, k).device == torch.device(trainer) for k in reference)
                results[name] = {"exact": supervision_equal(first, reference), "on_trainer_device": on_trainer}
                del first
            for _ in range(args.rounds):
                rates["bare"].append(calls_per_second(bare, args.requests))
                for name, remote in clients.items():
                    rates[name].append(_served_rate(remote, batch, args.requests))
            for name, remote in clients.items():
                stats = remote.transport_stats()[0]
                results[name].update(tier=stats["tier"], fallbacks=stats["fallbacks"])
        finally:
            for remote in clients.values():
                remote.close()
    limit = statistics.median(rates["bare"])
    for name, result in results.items():
        served = statistics.median(rates[name])
        result.update(served_per_s=served, of_bare=served / limit)
        verdict = "exact" if result["exact"] else "NOT EXACT"
        print(
            f"{name:>5}: {served:8.2f} answers/s = {served / limit:5.0%} of the bare forward "
            f"({limit:.2f}/s); tier {result['tier']}, {verdict}",
            flush=True,
        )
    for name, why in skipped.items():
        print(f"{name:>5}: skipped, {why}")
    exact = all(r["exact"] and r["on_trainer_device"] for r in results.values())
    gpu = torch.cuda.get_device_name(0) if cuda else "cpu"
    shape = {"batch_size": args.batch_size, "seq_len": args.seq_len, "draft_vocab": mapping.draft_vocab_size}
    line = {
        "check": "serving-speed",
        "device": gpu,
        "torch": torch.__version__,
        "model": model,
        "dtype": "bfloat16",
        **shape,
        "bare_per_s": limit,
        "tiers": results,
        "skipped": skipped,
        "rates": rates,
        "exact": exact,
    }
    print(json.dumps(line, sort_keys=True))
    return 0 if exact else 1


if __name__ == "__main__":
    raise SystemExit(main())
