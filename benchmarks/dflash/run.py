"""``python -m benchmarks.dflash``: a DFlash capture beside EAGLE-3, from one server, in one run.

One appliance process on the built-in model; the real clients fetch ``--requests`` batches of
``--batch`` x ``--seq-len`` tokens as EAGLE-3 ``probs`` (the baseline), as a DFlash capture of
``--layers`` and as the same capture with the logits, alternating ``--repeats`` times so that a
shared machine's drift hits all three. Prints, per mode, answers/s, bytes per answer and the
ratio to the baseline, then one JSON line. Every served batch of the first round is checked bit
for bit against the same model in this process (EAGLE-3: the appliance's in-process reference;
DFlash: the layers hooked here and the model's logits).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["main"]


def _parse(argv: list[str] | None) -> argparse.Namespace:
    from eagle3_appliance.settings import default_cache_dir

    parser = argparse.ArgumentParser(prog="python -m benchmarks.dflash", description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=8, help="answers per measurement")
    parser.add_argument("--repeats", type=int, default=2, help="measurements per mode (modes alternate)")
    parser.add_argument("--batch", type=int, default=4, help="rows per batch")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per row")
    parser.add_argument("--layers", default="1,3,5,6,7", help="the DFlash layer set")
    parser.add_argument("--draft-vocab", type=int, default=512, help="the EAGLE-3 baseline's draft vocabulary")
    parser.add_argument("--data-plane", default="wire", help="auto, gloo or wire")
    parser.add_argument("--cache-dir", type=Path, default=default_cache_dir(), help="where the model is generated")
    return parser.parse_args(argv)


def _reference(model: Any, inputs: tuple[Any, ...], layers: list[int]) -> tuple[Any, Any]:
    import torch

    outputs: dict[int, torch.Tensor] = {}
    handles = [
        model.model.layers[i].register_forward_hook(
            lambda _m, _a, out, i=i: outputs.__setitem__(i, out[0] if isinstance(out, tuple) else out)
        )
        for i in layers
    ]
    try:
        with torch.no_grad():
            logits = model(input_ids=inputs[0], attention_mask=inputs[1]).logits
    finally:
        for handle in handles:
            handle.remove()
    return torch.cat([outputs[i] for i in layers], dim=-1), logits


def main(argv: list[str] | None = None) -> None:
    import torch

    from eagle3_appliance.core.inputs import GenerateInputs, VocabMapping
    from eagle3_appliance.launch import ServerProcess
    from eagle3_appliance.model.builtin_model import ensure_builtin_model
    from eagle3_appliance.model.loading import load_target
    from eagle3_appliance.model.supervision import in_process, supervision_equal
    from eagle3_appliance.settings import Settings
    from eagle3_client import RemoteDFlashTargetModel, RemoteEagle3TargetModel
    from eagle3_client.synthetic import random_batch, vocab_mapping

    args = _parse(argv)
    layers = [int(i) for i in args.layers.split(",")]
    ensure_builtin_model(args.cache_dir)
    target = load_target(Settings(cache_dir=args.cache_dir, device="cpu"))
    vocab = target.vocab_size
    ids, mask = vocab_mapping(target.logits_size, args.draft_vocab, seed=1)
    batches = [random_batch(vocab, args.batch, args.seq_len, seed=i, pad=True) for i in range(args.requests)]
    server_args = ["--cache-dir", str(args.cache_dir), "--device", "cpu", "--log-level", "WARNING"]
    opts = {"data_plane": args.data_plane, "timeout": 300}
    with ServerProcess(server_args) as server:
        clients: dict[str, Any] = {
            "eagle3 probs": RemoteEagle3TargetModel.from_urls([server.url], **opts),
            "dflash": RemoteDFlashTargetModel.from_urls([server.url], target_layer_ids=layers, **opts),
            "dflash+logits": RemoteDFlashTargetModel.from_urls(
                [server.url], target_layer_ids=layers, capture_logits=True, **opts
            ),
        }
        clients["eagle3 probs"].set_vocab_mapping(ids, mask)
        try:
            exact = True
            for name, client in clients.items():  # warm-up, and the bit-exactness check
                for inputs in batches[:2]:
                    got = client.generate_batch(*inputs)
                    if name.startswith("eagle3"):
                        want = in_process(target, GenerateInputs(*inputs), VocabMapping(ids, mask))
                        exact &= supervision_equal(got, want)
                    else:
                        hidden, logits = _reference(target.model, inputs, layers)
                        exact &= torch.equal(got.hidden_states, hidden)
                        exact &= got.logits is None or torch.equal(got.logits, logits)
            rates: dict[str, list[float]] = {name: [] for name in clients}
            sizes: dict[str, int] = {}
            for _ in range(args.repeats):
                for name, client in clients.items():
                    before = sum(client.transport_stats()[0]["bytes"].values())
                    start = time.perf_counter()
                    for inputs in batches:
                        client.generate_batch(*inputs)
                    rates[name].append(args.requests / (time.perf_counter() - start))
                    sizes[name] = (sum(client.transport_stats()[0]["bytes"].values()) - before) // args.requests
        finally:
            for client in clients.values():
                client.close()
    base = statistics.median(rates["eagle3 probs"])
    print(f"built-in model, {args.batch} x {args.seq_len} tokens, layers {layers}, data plane {args.data_plane}")
    print(f"{'mode':<16}{'answers/s':>12}{'vs eagle3':>11}{'bytes/answer':>15}")
    for name in clients:
        rate = statistics.median(rates[name])
        print(f"{name:<16}{rate:>12.2f}{rate / base:>10.2f}x{sizes[name]:>15,}")
    print(f"bit-exact: {'yes' if exact else 'NO'}")
    print(json.dumps({"rates": rates, "bytes": sizes, "exact": exact}))
    sys.exit(0 if exact else 1)
