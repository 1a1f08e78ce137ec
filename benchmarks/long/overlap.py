"""``python -m benchmarks.long.overlap``: a long ``probs`` answer streamed while it is computed, against sent whole.

One server (the wide checkpoint of :mod:`benchmarks.long`, on the CPU, ``--logits-slice-mib``
slices) and two raw sessions on it: ``streamed`` offered the ``streamed-answer`` capability,
``whole`` did not (the answer is computed, then sent, as upstream's). Per length, ``--repeats``
requests of each, taking turns (the order flips every round), each timed from the request to its
first body byte and to its last. Both bodies of a round must be the same bytes (checked). Prints
a table of medians, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

__all__ = ["main"]


def _parse(argv: list[str] | None) -> argparse.Namespace:
    from eagle3_appliance.settings import default_cache_dir

    parser = argparse.ArgumentParser(prog="python -m benchmarks.long.overlap", description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="4096", help="comma-separated sequence lengths (B = 1)")
    parser.add_argument("--draft-vocab", type=int, default=8192, help="draft vocabulary D of the answers")
    parser.add_argument("--logits-slice-mib", type=int, default=64, help="the server's LM-head slice size")
    parser.add_argument("--repeats", type=int, default=3, help="requests per mode and length")
    parser.add_argument("--cache-dir", type=Path, default=default_cache_dir(), help="where the checkpoint is made")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    import httpx

    from benchmarks.long.run import WIDE_CONFIG_OVERRIDE
    from eagle3_appliance.launch import ServerProcess
    from eagle3_appliance.model.builtin_model import BUILTIN_CONFIG, ensure_builtin_model
    from eagle3_client import protocol, wire
    from eagle3_client.synthetic import random_batch, vocab_mapping

    lengths = sorted(int(x) for x in args.lengths.split(","))
    model_dir = ensure_builtin_model(args.cache_dir, config={**BUILTIN_CONFIG, **WIDE_CONFIG_OVERRIDE})
    mapping = wire.encode(
        dict(zip(protocol.VOCAB_MAPPING_KEYS, vocab_mapping(32000, args.draft_vocab, seed=1), strict=True))
    )
    offers = {
        "streamed": (protocol.CAPABILITY_STREAMED_ANSWER,),
        "whole": (),
    }
    server_args = ["--model", str(model_dir), "--max-seq-len", str(max(lengths))]
    server_args += ["--logits-slice-mib", str(args.logits_slice_mib)]
    results: dict[str, dict[int, dict[str, float]]] = {mode: {} for mode in offers}
    with (
        ServerProcess(server_args, startup_timeout=600) as server,
        httpx.Client(base_url=server.url, timeout=3600, trust_env=False) as http,
    ):
        headers: dict[str, dict[str, str]] = {}
        for mode, capabilities in offers.items():
            offer = protocol.SessionOffer(client=f"overlap-{mode}", capabilities=capabilities)
            reply = protocol.SessionReply.from_json(http.post("/session", json=offer.to_json()).json())
            headers[mode] = {protocol.SESSION_HEADER: reply.session_id}
            http.post("/set_vocab_mapping", content=mapping, headers=headers[mode]).raise_for_status()
        for seq_len in lengths:
            body = wire.encode(
                dict(zip(protocol.GENERATE_INPUT_KEYS, random_batch(32000, 1, seq_len, seed=seq_len), strict=True))
            )
            times: dict[str, dict[str, list[float]]] = {mode: {"first": [], "total": []} for mode in offers}
            for round_ in range(args.repeats + 1):  # round 0 warms the buffer pool and is not counted
                digests: dict[str, bytes] = {}
                for mode in list(offers) if round_ % 2 == 0 else list(offers)[::-1]:
                    start = time.perf_counter()
                    first = None
                    received = bytearray()
                    with http.stream("POST", "/generate", content=body, headers=headers[mode]) as response:
                        response.raise_for_status()
                        for chunk in response.iter_raw():
                            if first is None:
                                first = time.perf_counter() - start
                            received += chunk
                    total = time.perf_counter() - start
                    digests[mode] = bytes(received)
                    if round_:
                        times[mode]["first"].append(first or total)
                        times[mode]["total"].append(total)
                assert digests["streamed"] == digests["whole"], f"T={seq_len}: the bodies differ"
            for mode in offers:
                results[mode][seq_len] = {k: statistics.median(v) for k, v in times[mode].items()}
    print(f"{'T':>7} {'mode':>9} {'first byte s':>13} {'total s':>9}")
    for seq_len in lengths:
        for mode in offers:
            row = results[mode][seq_len]
            print(f"{seq_len:>7} {mode:>9} {row['first']:>13.3f} {row['total']:>9.3f}")
    print(
        json.dumps(
            {
                "benchmark": "long.overlap",
                "draft_vocab": args.draft_vocab,
                "logits_slice_mib": args.logits_slice_mib,
                "repeats": args.repeats,
                "bytes_identical": True,
                "results": {m: {str(t): r for t, r in v.items()} for m, v in results.items()},
            }
        )
    )


if __name__ == "__main__":
    main()
