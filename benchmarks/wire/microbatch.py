"""Micro-batching, measured: several concurrent clients with batching off, then on.

Each client is its own session (own draft vocabulary) in its own thread and sends the same
batch ``rounds`` times, back to back. Both servers run side by side and the two modes take
turns ``repeats`` times, so that drift in a shared machine's load hits both alike.
Throughput is all answers over the summed wall time of each mode's round loops. Every
answer is compared with the unbatched in-process supervision of its inputs: the largest
absolute deviation of the floats and the number of ``position_mask`` entries that differ
are what batching costs in exactness.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.wire.cases import Case
from eagle3_appliance.core.inputs import GenerateInputs, VocabMapping
from eagle3_appliance.launch import ServerProcess
from eagle3_appliance.model.loading import load_target
from eagle3_appliance.model.supervision import in_process
from eagle3_appliance.settings import Settings
from eagle3_client import RemoteEagle3TargetModel
from eagle3_client.synthetic import random_batch, vocab_mapping

__all__ = ["run_microbatch"]


def _deviation(batch: Any, want: dict[str, torch.Tensor]) -> tuple[float, float, int]:
    probs = (batch.target_probs - want["target_probs"]).abs().max().item()
    aux = (batch.aux_hidden_states - want["aux_hidden_states"]).abs().max().item()
    flips = int((batch.position_mask != want["position_mask"]).sum())
    return probs, aux, flips


def _drive(url: str, case_inputs: list, mappings: list, refs: list, rounds: int) -> dict[str, float]:
    clients = len(case_inputs)
    start_gate = threading.Barrier(clients + 1)
    dev = {"probs": 0.0, "aux": 0.0, "flips": 0}
    lock = threading.Lock()

    def client(i: int) -> None:
        with RemoteEagle3TargetModel.from_urls([url], device="cpu", data_plane="wire") as remote:
            remote.set_vocab_mapping(mappings[i].selected_token_ids, mappings[i].selected_token_mask)
            remote.generate_batch(*case_inputs[i])  # warm-up, outside the timing
            start_gate.wait()
            for _ in range(rounds):
                batch = remote.generate_batch(*case_inputs[i])
                probs, aux, flips = _deviation(batch, refs[i])
                with lock:
                    dev["probs"] = max(dev["probs"], probs)
                    dev["aux"] = max(dev["aux"], aux)
                    dev["flips"] += flips

    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(client, i) for i in range(clients)]
        start_gate.wait()
        start = time.perf_counter()
        for f in futures:
            f.result()
        wall = time.perf_counter() - start
    return {"seconds": wall, "answers": clients * rounds, **dev}


def run_microbatch(
    case: Case,
    model: str,
    *,
    cache_dir: Path,
    clients: int = 4,
    rounds: int = 4,
    repeats: int = 3,
    wait_ms: float = 20.0,
) -> dict[str, Any]:
    """Answers per second and deviation from unbatched, without and with ``--microbatch-wait-ms``."""
    target = load_target(Settings(model=model, cache_dir=cache_dir))
    vocab = target.logits_size
    mappings = [VocabMapping(*vocab_mapping(vocab, min(case.draft_vocab, vocab), seed=i)) for i in range(clients)]
    inputs = [random_batch(target.vocab_size, case.batch_size, case.seq_len, seed=100 + i) for i in range(clients)]
    refs = [in_process(target, GenerateInputs(*inputs[i]), mappings[i]) for i in range(clients)]
    del target
    out: dict[str, Any] = {"case": case.name, "clients": clients, "rounds": rounds * repeats, "wait_ms": wait_ms}
    base = ["--model", model, "--cache-dir", str(cache_dir), "--log-level", "WARNING"]
    modes = {"off": [], "on": ["--microbatch-wait-ms", str(wait_ms)]}
    totals = {mode: {"seconds": 0.0, "answers": 0, "probs": 0.0, "aux": 0.0, "flips": 0} for mode in modes}
    with tempfile.TemporaryDirectory(prefix="eagle3-bench-mb-") as tmp, contextlib.ExitStack() as stack:
        urls = {
            mode: stack.enter_context(ServerProcess(base + extra, log_path=Path(tmp) / f"{mode}.log")).url
            for mode, extra in modes.items()
        }
        for _ in range(repeats):
            for mode in modes:
                result = _drive(urls[mode], inputs, mappings, refs, rounds)
                total = totals[mode]
                total["seconds"] += result["seconds"]
                total["answers"] += result["answers"]
                total["probs"] = max(total["probs"], result["probs"])
                total["aux"] = max(total["aux"], result["aux"])
                total["flips"] += result["flips"]
    for mode, total in totals.items():
        out[f"{mode}_answers_per_s"] = total["answers"] / total["seconds"]
        out[f"{mode}_max_abs_dev_probs"] = total["probs"]
        out[f"{mode}_max_abs_dev_aux"] = total["aux"]
        out[f"{mode}_position_mask_flips"] = total["flips"]
    out["gain"] = out["on_answers_per_s"] / out["off_answers_per_s"]
    return out
