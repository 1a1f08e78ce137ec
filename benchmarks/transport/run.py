"""Transport benchmark: MB/s of one supervision answer per data-plane tier, beside a raw TCP socket.

Usage::

    python -m benchmarks.transport                     # ~300 MB answers: B=1, T=2048, D=36608
    python -m benchmarks.transport --draft-vocab 4096  # smaller answers, quicker
    python -m benchmarks.transport --sessions 24 --seq-len 512 --draft-vocab 8192   # server memory

It serves a wide variant of the built-in model (made from a seed; the vocabulary sets the
answer size) from a real appliance process on 127.0.0.1 and fetches the same batch over
each tier with the real client. The MB/s are transfer-only (from the answer's first byte
to its last tensor, as the client's ``transport_stats()`` counts them), so the forward that
precedes every answer does not dilute them; end-to-end seconds per batch are printed too.
The baseline is a raw loopback socket (``sendall`` into a preallocated ``recv_into``) of the
same size, measured in the same run. ``nccl`` runs only where two GPUs are visible (the
server on the first, this client on the second). Numbers are medians over ``--repeats``.

With ``--sessions N`` it measures the server's memory over N connected sessions instead
(:mod:`benchmarks.transport.sessions`): the answers kept for resends, within
``--budget-mb``, against an unbounded baseline and the wire tier.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch

from eagle3_appliance.core.inputs import VocabMapping
from eagle3_appliance.launch import ServerProcess
from eagle3_appliance.model.builtin_model import BUILTIN_CONFIG, ensure_builtin_model
from eagle3_appliance.progress import Progress, track
from eagle3_client import RemoteEagle3TargetModel, protocol
from eagle3_client.synthetic import random_batch, vocab_mapping

from .sessions import run_sessions

__all__ = ["main", "raw_socket_mb_s", "supervision_bytes"]

MB = 1e6


def supervision_bytes(batch: int, seq_len: int, hidden: int, draft_vocab: int) -> int:
    """Bytes of one answer: fp32 aux [B,T,3H] and probs [B,T,D], bool mask, two int64 [B,T]."""
    tokens = batch * seq_len
    return tokens * (3 * hidden * 4 + draft_vocab * 4 + 1 + 8 + 8)


def raw_socket_mb_s(nbytes: int, repeats: int) -> list[float]:
    """MB/s of ``nbytes`` over a loopback TCP socket, sender on a thread, receiver into one buffer."""
    payload = memoryview(bytearray(nbytes))
    sink = memoryview(bytearray(nbytes))
    rates = []
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        for _ in range(repeats):
            sender = threading.Thread(target=lambda: _send_once(listener, payload))
            sender.start()
            with socket.create_connection(("127.0.0.1", port)) as conn:
                start = time.perf_counter()
                got = 0
                while got < nbytes:
                    n = conn.recv_into(sink[got:], nbytes - got)
                    if n == 0:
                        raise ConnectionError("sender closed early")
                    got += n
                rates.append(nbytes / MB / (time.perf_counter() - start))
            sender.join()
    return rates


def _send_once(listener: socket.socket, payload: memoryview) -> None:
    conn, _ = listener.accept()
    with conn:
        conn.sendall(payload)


def _tier_run(
    url: str, tier: str, device: str, mapping: tuple[torch.Tensor, torch.Tensor], batch: tuple, repeats: int
) -> tuple[list[float], list[float], dict[str, torch.Tensor], dict]:
    """(transfer MB/s per batch, end-to-end seconds per batch, last answer, final stats)."""
    rates, e2e = [], []
    with RemoteEagle3TargetModel.from_urls([url], device=device, timeout=600, data_plane=tier) as remote:
        remote.set_vocab_mapping(*mapping)
        remote.generate_batch(*batch)  # warm-up: brings a group up, first transfer, allocator
        for _ in track(range(repeats), Progress(f"transport {tier}", repeats, unit="batches")):
            before = remote.transport_stats()[0]
            start = time.perf_counter()
            result = remote.generate_batch(*batch)
            e2e.append(time.perf_counter() - start)
            after = remote.transport_stats()[0]
            used = after["tier"]
            moved = after["bytes"][used] - before["bytes"][used]
            seconds = after["transfer_seconds"][used] - before["transfer_seconds"][used]
            rates.append(moved / MB / seconds if seconds > 0 else float("nan"))
        answer = {k: getattr(result, k).cpu() for k in protocol.SUPERVISION_KEYS}
        return rates, e2e, answer, remote.transport_stats()[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.transport", description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=64, help="model width (aux states are 3 x this)")
    parser.add_argument("--draft-vocab", type=int, default=36608, help="draft vocabulary = target vocabulary here")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tiers", default="auto", help="comma-separated tiers, or auto (wire, gloo, nccl if 2 GPUs)")
    parser.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "eagle3-bench-transport")
    parser.add_argument("--sessions", type=int, default=0, help="measure server memory over this many sessions")
    parser.add_argument("--budget-mb", type=int, default=64, help="--resend-budget-mb of the --sessions run")
    args = parser.parse_args(argv)

    two_gpus = torch.cuda.is_available() and torch.cuda.device_count() >= 2
    tiers = ["wire", "gloo", *(["nccl"] if two_gpus else [])] if args.tiers == "auto" else args.tiers.split(",")
    vocab = args.draft_vocab
    heads = max(1, args.hidden // 16)
    config = dict(BUILTIN_CONFIG, vocab_size=vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden)
    config.update(num_attention_heads=heads, num_key_value_heads=heads)
    model_dir = ensure_builtin_model(args.cache_dir, config)
    nbytes = supervision_bytes(args.batch, args.seq_len, args.hidden, args.draft_vocab)
    server_args = ["--model", str(model_dir), "--max-seq-len", str(args.seq_len), "--data-plane-timeout", "600"]
    server_args += ["--max-batch-tokens", str(max(65536, args.batch * args.seq_len))]
    mapping = VocabMapping(*vocab_mapping(vocab, args.draft_vocab, seed=0))
    batch = random_batch(vocab, args.batch, args.seq_len, seed=0)
    if args.sessions > 0:
        return run_sessions(server_args, args.cache_dir, args.sessions, args.budget_mb, mapping, batch, nbytes)
    print(
        f"== transport benchmark: B={args.batch} T={args.seq_len} H={args.hidden} D={args.draft_vocab} -> "
        f"{nbytes / MB:.1f} MB per answer, median of {args.repeats}"
    )
    raw = raw_socket_mb_s(nbytes, args.repeats)
    print(f"{'raw TCP loopback socket':<28} {statistics.median(raw):9.1f} MB/s   (sendall -> recv_into, same size)")

    server_env = {"CUDA_VISIBLE_DEVICES": "0"} if two_gpus else {}
    client_device = "cuda:1" if two_gpus else "cpu"
    answers: dict[str, dict[str, torch.Tensor]] = {}
    log = args.cache_dir / "server.log"
    with ServerProcess(server_args, env=server_env, log_path=log, startup_timeout=600) as server:
        for tier in tiers:
            device = client_device if tier == "nccl" else "cpu"
            rates, e2e, answer, stats = _tier_run(
                server.url, tier, device, (mapping.selected_token_ids, mapping.selected_token_mask), batch, args.repeats
            )
            answers[tier] = answer
            note = "" if stats["tier"] == tier else f"  (ran on {stats['tier']}: fallbacks={stats['fallbacks']})"
            print(
                f"{tier + ' data plane':<28} {statistics.median(rates):9.1f} MB/s   "
                f"end-to-end {statistics.median(e2e):.2f} s/batch (forward included){note}"
            )
    for tier in tiers[1:]:
        same = all(torch.equal(answers[tier][k], answers[tiers[0]][k]) for k in protocol.SUPERVISION_KEYS)
        print(f"bit-exact   {tier} == {tiers[0]}: {'yes' if same else 'NO'}")
        if not same:
            return 1
    if "nccl" not in tiers:
        print("nccl        not run: needs two visible GPUs (NCCL cannot pair two ranks on one GPU)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
