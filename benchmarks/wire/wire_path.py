"""The appliance's wire path end to end: a real server process driven by the real client.

Each request is timed in three places: when ``generate_batch`` is called, when the
client's :meth:`eagle3_client.transports.control.ControlPlane.read_wire` is entered (the response head has
arrived, so the server's forward and projection are done) and when ``generate_batch``
returns (tensors decoded and handed over on the trainer's device). The *transfer* is the
second interval: server send, kernel, client receive and decode, which is what the raw
loopback socket is compared with. The server's peak and current RSS are read from
``/proc/<pid>/status`` after every request. After every request the same model's bare
forward + softmax + argmax (:mod:`benchmarks.bare`) runs once in this process, so the served
rate and its limit are measured alternating, under the same load.
"""

from __future__ import annotations

import contextlib
import statistics
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import torch

from benchmarks.bare import bare_model, bare_step, time_once
from benchmarks.wire.cases import Case
from eagle3_appliance.core.inputs import GenerateInputs, VocabMapping
from eagle3_appliance.launch import ServerProcess
from eagle3_appliance.model.loading import load_target
from eagle3_appliance.model.supervision import in_process, supervision_equal
from eagle3_appliance.settings import Settings
from eagle3_client import RemoteEagle3TargetModel
from eagle3_client.synthetic import random_batch, vocab_mapping
from eagle3_client.transports.control import ControlPlane

__all__ = ["WireRun", "proc_status_kb", "run_wire"]


@dataclass
class WireRun:
    """Per-request measurements of one case."""

    payload_bytes: int = 0
    latency_s: list[float] = field(default_factory=list)
    transfer_s: list[float] = field(default_factory=list)
    server_hwm_kb: list[int] = field(default_factory=list)
    server_rss_kb: list[int] = field(default_factory=list)
    bare_s: list[float] = field(default_factory=list)
    bit_exact: bool | None = None

    def steady(self, values: list[float], warmup: int) -> list[float]:
        return values[warmup:] or values

    def summary(self, warmup: int) -> dict[str, float | int | bool | None]:
        measured = [t for t in self.steady(self.transfer_s, warmup) if t == t]  # NaN: not a wire answer
        transfer = statistics.median(measured) if measured else float("nan")
        latency = statistics.median(self.steady(self.latency_s, warmup))
        hwm_warm = self.server_hwm_kb[min(warmup, len(self.server_hwm_kb)) - 1] if self.server_hwm_kb else 0
        bare = statistics.median(self.steady(self.bare_s, warmup)) if self.bare_s else float("nan")
        return {
            "payload_bytes": self.payload_bytes,
            "requests": len(self.latency_s),
            "transfer_ms_median": transfer * 1e3,
            "wire_gbps": self.payload_bytes / transfer / 1e9,
            "latency_ms_median": latency * 1e3,
            "e2e_gbps": self.payload_bytes / latency / 1e9,
            "served_per_s": 1 / latency,
            "bare_per_s": 1 / bare,
            "served_vs_bare": bare / latency,
            "server_hwm_mb_after_warmup": hwm_warm / 1024,
            "server_hwm_mb_end": (self.server_hwm_kb[-1] if self.server_hwm_kb else 0) / 1024,
            "server_rss_mb_min": min(self.steady(self.server_rss_kb, warmup), default=0) / 1024,
            "server_rss_mb_max": max(self.steady(self.server_rss_kb, warmup), default=0) / 1024,
            "bit_exact": self.bit_exact,
        }


def proc_status_kb(pid: int) -> tuple[int, int]:
    """``(VmHWM, VmRSS)`` of a process in KiB: its peak and current resident memory."""
    fields: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in ("VmHWM", "VmRSS"):
                fields[name] = int(value.split()[0])
    return fields.get("VmHWM", 0), fields.get("VmRSS", 0)


@contextlib.contextmanager
def _mark_heads(marks: list[float], sizes: list[int]) -> Iterator[None]:
    """Record when each wire response's head arrives (and its length) without changing the client."""
    original = ControlPlane.read_wire

    def timed(self: ControlPlane, resp: httpx.Response) -> dict[str, torch.Tensor | None]:
        marks.append(time.perf_counter())
        sizes.append(int(resp.headers.get("content-length", 0)))
        return original(self, resp)

    ControlPlane.read_wire = timed  # type: ignore[method-assign]
    try:
        yield
    finally:
        ControlPlane.read_wire = original  # type: ignore[method-assign]


def run_wire(
    case: Case,
    model: str,
    *,
    requests: int,
    cache_dir: Path,
    server_args: list[str] | None = None,
    check_exact: bool = True,
    data_plane: str = "wire",
) -> WireRun:
    """Start a server for ``model``, send ``requests`` identical batches with the real client,
    each followed by one bare forward of the same model in this process."""
    run = WireRun()
    settings = Settings(model=model, cache_dir=cache_dir)
    target = load_target(settings)
    mapping = VocabMapping(*vocab_mapping(target.logits_size, min(case.draft_vocab, target.logits_size)))
    inputs = random_batch(target.vocab_size, case.batch_size, case.seq_len, seed=0)
    reference = in_process(target, GenerateInputs(*inputs), mapping) if check_exact else None
    del target
    bare = bare_step(bare_model(settings), inputs[0], inputs[1])
    bare()  # warm-up
    args = ["--model", model, "--cache-dir", str(cache_dir), "--log-level", "WARNING", *(server_args or [])]
    marks: list[float] = []
    sizes: list[int] = []
    with tempfile.TemporaryDirectory(prefix="eagle3-bench-") as tmp:
        with ServerProcess(args, log_path=Path(tmp) / "server.log") as server, _mark_heads(marks, sizes):
            assert server.proc is not None
            with RemoteEagle3TargetModel.from_urls([server.url], device="cpu", data_plane=data_plane) as remote:
                remote.set_vocab_mapping(mapping.selected_token_ids, mapping.selected_token_mask)
                for i in range(requests):
                    start = time.perf_counter()
                    batch = remote.generate_batch(*inputs)
                    end = time.perf_counter()
                    run.latency_s.append(end - start)
                    run.transfer_s.append(end - marks[-1] if marks else float("nan"))
                    marks.clear()
                    if i == 0 and reference is not None:
                        run.bit_exact = supervision_equal(batch, reference)
                        reference = None
                    del batch
                    hwm, rss = proc_status_kb(server.proc.pid)
                    run.server_hwm_kb.append(hwm)
                    run.server_rss_kb.append(rss)
                    run.bare_s.append(time_once(bare))
    run.payload_bytes = sizes[-1] if sizes else 0
    return run
