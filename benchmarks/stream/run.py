"""Stream benchmark: one trainer fed three ways by two appliances, through the same faults, in one run.

Usage::

    python -m benchmarks.stream                                  # every way and scenario, ~5 min
    python -m benchmarks.stream --samples 12 --scenarios steady  # the CI smoke run

Two appliance processes (the built-in model, ``--stream-memory-mb 256``) and one trainer loop in
this process: each step gets a batch's supervision (B = 2 x T = 256 random ids, draft vocabulary
256), then sleeps ``--step-seconds`` (the draft's forward and backward). A *sample* is one such
batch (one ``/generate``, one stream sample). The trainer gets them three ways:

* ``blocking``: ``RemoteEagle3TargetModel.generate_batch`` per step, over the fleet of both;
* ``prefetch``: ``generate_batch_async`` keeping ``--depth`` requests in flight, refilled only
  after the oldest completed (NeMo AutoModel's ``_prefetched_batches``);
* ``stream``: a :class:`~eagle3_client.streaming.producer.Producer` in this process has both
  appliances compute the run ahead (its queue hosted on the first appliance); the trainer
  iterates upstream's ``FeatureDataLoader`` over ``open_stream(..., read_ahead=--read-ahead)``.
  The producer starts ``--head-start`` samples ahead of the trainer.

Each way runs through each scenario, the faults always hitting the second appliance (the first
hosts the stream's queue, which an appliance-hosted queue does not survive):

* ``steady``: nothing goes wrong;
* ``freeze``: at step ``samples // 3`` (once the appliance has a request in flight, waiting at
  most 1 s for one) SIGSTOP for ``--freeze-seconds``, then SIGCONT;
* ``kill-server``: SIGKILL at step ``samples // 2``; a fresh appliance replaces it afterwards;
* ``kill-trainer``: at step ``samples // 2`` the trainer dies holding its batch. Blocking and
  prefetch: its client is dropped with the requests in flight, a new client starts and the
  trainer redoes that step. Stream: its loader stops without acking the current lease (its queue
  is closed, as a stopping loader's is: read-ahead leases go back), a new ``open_stream`` and
  loader continue the same run; the lost lease comes back after ``--visibility-timeout``.

Printed per way and scenario: samples trained (each once: the stream delivers at least once) per
second of the loop's wall time, the share of that wall time the trainer waited for supervision
(inside ``generate_batch``, ``result()``, the loader's ``next()``, and a restarted trainer's new
client or ``open_stream``), the longest single wait (also in trainer steps), and the samples
computed more than once: the appliances' ``eagle3_inference_exec_count_total`` (blocking,
prefetch) or ``eagle3_stream_produced_total`` (stream) over the scenario, minus the samples
trained (a killed appliance's counter is read just before the kill). First the fleet's capacity
(``prefetch`` with both appliances busy and no step time) beside the trainer's demand (1 / step
time). The target it is read against (printed,
not asserted): the stream waits at most 1 % of the wall time and never longer than two steps at
once, in every scenario, with a fleet capacity at least 1.2x the demand. Every loop is bounded:
``--samples`` steps and ``--scenario-timeout`` seconds.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import torch

__all__ = ["main"]

WAYS = ("blocking", "prefetch", "stream")
SCENARIOS = ("steady", "freeze", "kill-server", "kill-trainer")
BATCH, SEQ_LEN, DRAFT_VOCAB = 2, 256, 256
EXEC = "eagle3_inference_exec_count_total"
PRODUCED = "eagle3_stream_produced_total"
TARGET_WAITED, TARGET_LONGEST_STEPS, TARGET_CAPACITY = 0.01, 2.0, 1.2


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.stream", description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=60, help="trainer steps (samples) per way and scenario")
    parser.add_argument("--step-seconds", type=float, default=0.2, help="the trainer's step (a sleep)")
    parser.add_argument("--freeze-seconds", type=float, default=6.0, help="how long the freeze scenario stops a server")
    parser.add_argument("--ways", default=",".join(WAYS), help=f"comma-separated, of {WAYS}")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"comma-separated, of {SCENARIOS}")
    parser.add_argument("--depth", type=int, default=2, help="requests in flight of the prefetch way")
    parser.add_argument("--read-ahead", type=int, default=4, help="the stream's open_stream(read_ahead=...)")
    parser.add_argument("--head-start", type=int, default=10, help="samples on the queue before the trainer starts")
    parser.add_argument("--visibility-timeout", type=float, default=3.0, help="the stream's lease (seconds)")
    parser.add_argument("--stream-memory-mb", type=int, default=256, help="each appliance's stream high watermark")
    parser.add_argument("--server-threads", type=int, default=1, help="--intra-op-threads of each appliance")
    parser.add_argument("--capacity-samples", type=int, default=24, help="samples for the fleet's capacity")
    parser.add_argument("--scenario-timeout", type=float, default=90.0, help="bound on one way's loop (seconds)")
    parser.add_argument("--cache-dir", type=Path, default=Path(".cache/eagle3-appliance"))
    parser.add_argument("--log-dir", type=Path, default=None, help="the appliances' logs (default: a temp folder)")
    args = parser.parse_args(argv)
    for name, allowed in (("ways", WAYS), ("scenarios", SCENARIOS)):
        chosen = [s.strip() for s in getattr(args, name).split(",") if s.strip()]
        unknown = sorted(set(chosen) - set(allowed))
        if unknown or not chosen:
            parser.error(f"--{name}: unknown or none {unknown} (of {allowed})")
        setattr(args, name, [s for s in allowed if s in chosen])
    if args.samples < 3 or args.step_seconds < 0 or args.depth < 1 or args.read_ahead < 0:
        parser.error("--samples >= 3, --step-seconds >= 0, --depth >= 1, --read-ahead >= 0")
    return args


def _metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10, trust_env=False).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith((name + " ", name + "{")))


class Fleet:
    """The two appliances; the second one is the one the faults hit, replaced after a kill."""

    def __init__(self, args: argparse.Namespace, log_dir: Path) -> None:
        self.server_args = ["--cache-dir", str(args.cache_dir), "--device", "cpu", "--log-level", "WARNING"]
        self.server_args += ["--stream-memory-mb", str(args.stream_memory_mb)]
        self.server_args += ["--intra-op-threads", str(args.server_threads)]
        self.log_dir = log_dir
        self.started = 0
        self.servers = [self._start() for _ in range(2)]
        self.killed: dict[str, float] = {}  # counter values read just before a kill, by url

    def _start(self) -> Any:
        from eagle3_appliance.launch import ServerProcess

        self.started += 1
        return ServerProcess(self.server_args, log_path=self.log_dir / f"appliance-{self.started}.log").start()

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.servers]

    @property
    def queue_url(self) -> str:
        return "appliance://" + str(self.servers[0].url).removeprefix("http://")

    @property
    def victim(self) -> Any:
        return self.servers[1]

    def counters(self, name: str) -> dict[str, float]:
        out = {s.url: _metric(s.url, name) for s in self.servers if s.proc is not None and s.proc.poll() is None}
        return {**out, **{url: v for url, v in self.killed.items() if url not in out}}

    def kill(self, name: str) -> None:
        url = self.victim.url
        self.killed[url] = _metric(url, name)
        self.victim.proc.send_signal(signal.SIGKILL)
        self.victim.proc.wait(30)

    def heal(self) -> None:
        """A fresh second appliance if the last scenario killed it (and never a stopped one left behind)."""
        proc = self.victim.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            return
        self.victim.stop()
        self.servers[1] = self._start()
        self.killed.clear()

    def close(self) -> None:
        for server in self.servers:
            if server.proc is not None and server.proc.poll() is None:
                server.proc.send_signal(signal.SIGCONT)
            server.stop()


class Fault:
    """The scenario's fault, fired once from the trainer loop at step ``at`` (on its own thread)."""

    def __init__(self, scenario: str, fleet: Fleet, args: argparse.Namespace, counter: str) -> None:
        self.scenario, self.fleet, self.args, self.counter = scenario, fleet, args, counter
        at = {"freeze": args.samples // 3, "kill-server": args.samples // 2, "kill-trainer": args.samples // 2}
        self.at = at.get(scenario, -1)
        self.fired = False
        self.note = ""
        self.thread: threading.Thread | None = None

    def step(self, index: int) -> None:
        if self.fired or index != self.at or self.scenario not in ("freeze", "kill-server"):
            return
        self.fired = True
        self.thread = threading.Thread(target=self._fire, daemon=True)
        self.thread.start()

    def _fire(self) -> None:
        if self.scenario == "kill-server":
            self.fleet.kill(self.counter)
            self.note = "killed"
            return
        victim = self.fleet.victim
        deadline = time.monotonic() + 1.0
        busy = False
        while not busy and time.monotonic() < deadline:  # freeze it with work in flight when there is some
            busy = _metric(victim.url, "eagle3_inflight_requests") > 0
            if not busy:
                time.sleep(0.01)
        victim.proc.send_signal(signal.SIGSTOP)
        self.note = f"frozen {self.args.freeze_seconds:g} s ({'busy' if busy else 'idle'})"
        time.sleep(self.args.freeze_seconds)
        victim.proc.send_signal(signal.SIGCONT)

    def join(self) -> None:
        if self.thread is not None:
            self.thread.join(timeout=self.args.freeze_seconds + 60)


@dataclass
class Result:
    way: str
    scenario: str
    trained: int = 0
    wall_s: float = 0.0
    waits: list[float] = field(default_factory=list)
    computed: float = 0.0
    note: str = ""
    samples: list[str] = field(default_factory=list)  # the stream's sample id of every step trained

    @property
    def distinct(self) -> int:
        """Samples trained, each counted once (a stream may deliver a sample again: at least once)."""
        return len(set(self.samples)) if self.samples else self.trained

    @property
    def rate(self) -> float:
        return self.distinct / self.wall_s if self.wall_s else 0.0

    @property
    def waited(self) -> float:
        return sum(self.waits) / self.wall_s if self.wall_s else 0.0

    @property
    def longest(self) -> float:
        return max(self.waits, default=0.0)

    @property
    def extra(self) -> int:
        return round(self.computed) - self.distinct


class Trainer:
    """The loop's clock: every wait for supervision timed, the wall time from the first wait to the last step's end."""

    def __init__(self, result: Result, step_s: float, timeout: float) -> None:
        self.result, self.step_s = result, step_s
        self.start = time.perf_counter()
        self.deadline = time.monotonic() + timeout

    def wait(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        began = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self.result.waits.append(time.perf_counter() - began)

    def train(self) -> None:
        time.sleep(self.step_s)
        self.result.trained += 1
        self.result.wall_s = time.perf_counter() - self.start

    def out_of_time(self) -> bool:
        if time.monotonic() > self.deadline:
            self.result.note += " [timed out]"
            return True
        return False


class Context:
    def __init__(self, args: argparse.Namespace, fleet: Fleet) -> None:
        from eagle3_appliance.model.builtin_model import BUILTIN_CONFIG
        from eagle3_client.synthetic import random_batch, vocab_mapping

        vocab = int(BUILTIN_CONFIG["vocab_size"])  # type: ignore[call-overload]
        self.args, self.fleet = args, fleet
        self.mapping = vocab_mapping(vocab, DRAFT_VOCAB, seed=1)
        self.batches = [random_batch(vocab, BATCH, SEQ_LEN, seed=100 + i) for i in range(args.samples)]
        self.runs = 0

    def client(self, **options: Any) -> Any:
        from eagle3_client import RemoteEagle3TargetModel

        remote = RemoteEagle3TargetModel.from_urls(self.fleet.urls, timeout=60, **options)
        remote.set_vocab_mapping(*self.mapping)
        return remote

    def run_id(self, scenario: str) -> str:
        self.runs += 1
        return f"bench-{scenario}-{os.getpid()}-{time.time_ns() % 10**9}-{self.runs}"


def fleet_capacity(ctx: Context) -> float:
    """Samples/s of both appliances kept busy (2 requests in flight on each), no trainer step."""
    with ctx.client(max_in_flight_per_server=2) as remote:
        for handle in [remote.generate_batch_async(*ctx.batches[i % len(ctx.batches)]) for i in range(4)]:
            handle.result(timeout=120)  # warm-up
        count = ctx.args.capacity_samples
        began = time.perf_counter()
        handles = [remote.generate_batch_async(*ctx.batches[i % len(ctx.batches)]) for i in range(count)]
        for handle in handles:
            handle.result(timeout=300)
        return float(count / (time.perf_counter() - began))


def run_requests(ctx: Context, scenario: str, depth: int) -> Result:
    """Blocking (``depth`` 0) or prefetch ``depth``: the trainer asks for each batch itself."""
    args = ctx.args
    result = Result("blocking" if depth == 0 else f"prefetch {depth}", scenario)
    fault = Fault(scenario, ctx.fleet, args, EXEC)
    before = ctx.fleet.counters(EXEC)
    remote = ctx.client()
    trainer = Trainer(result, args.step_seconds, args.scenario_timeout)
    pending: collections.deque[Any] = collections.deque()
    submitted = index = 0
    killed = False
    try:
        while index < args.samples and not trainer.out_of_time():
            fault.step(index)
            if depth == 0:
                trainer.wait(remote.generate_batch, *ctx.batches[index])
            else:
                while submitted < min(args.samples, index + depth):  # the first fill (and after a restart)
                    pending.append(remote.generate_batch_async(*ctx.batches[submitted]))
                    submitted += 1
                oldest = pending.popleft()
                trainer.wait(oldest.result, timeout=args.scenario_timeout)
                if submitted < args.samples:  # refilled once the oldest completed
                    pending.append(remote.generate_batch_async(*ctx.batches[submitted]))
                    submitted += 1
            if scenario == "kill-trainer" and index == fault.at and not killed:
                killed = True  # dies in this step: its batch and the requests in flight are lost
                lost, old = len(pending), remote
                pending.clear()
                threading.Thread(target=old.close, daemon=True).start()
                remote = trainer.wait(ctx.client)  # the restarted trainer's client
                submitted = index  # it redoes this step
                result.note = f"restarted ({lost} in flight lost)"
                continue
            trainer.train()
            index += 1
    finally:
        remote.close()
    fault.join()
    time.sleep(0.5)  # a request abandoned at the end still counts its forward
    after = ctx.fleet.counters(EXEC)
    result.computed = sum(after.get(url, 0.0) - before.get(url, 0.0) for url in after)
    result.note = (result.note + " " + fault.note).strip()
    return result


def run_stream(ctx: Context, scenario: str) -> Result:
    from nemo_automodel.components.speculative.streaming import FeatureDataLoader

    from eagle3_client.streaming.open import open_stream
    from eagle3_client.streaming.producer import Producer

    args = ctx.args
    result = Result("stream", scenario)
    fault = Fault(scenario, ctx.fleet, args, PRODUCED)
    before = ctx.fleet.counters(PRODUCED)
    run_id, queue_url = ctx.run_id(scenario), ctx.fleet.queue_url
    batches = [dict(zip(("input_ids", "attention_mask", "loss_mask"), b, strict=True)) for b in ctx.batches]
    producer = Producer(
        ctx.fleet.urls,
        queue_url,
        run_id,
        batches,
        vocab_mapping=ctx.mapping,
        visibility_timeout=args.visibility_timeout,
        timeout=30,
        probe_interval=0.2,
        probe_max_interval=1.0,
    )
    outcome: dict[str, Any] = {}

    def produce() -> None:
        try:
            outcome["report"] = producer.run(timeout=args.scenario_timeout + 60)
        except BaseException as exc:  # noqa: BLE001 - printed with the row
            outcome["error"] = exc

    thread = threading.Thread(target=produce, name="producer", daemon=True)
    thread.start()

    leased: list[str] = []  # the sample id of the batch the loader yielded last

    def opened() -> tuple[Any, Any, Iterator[Any]]:
        queue, store = open_stream(queue_url, run_id=run_id, wait_for_run=60, read_ahead=args.read_ahead, timeout=30)
        acquire = queue.acquire

        def noted(**kwargs: Any) -> Any:  # which sample each step trains on
            lease = acquire(**kwargs)
            if lease is not None:
                leased.append(lease.ref.sample_id)
            return lease

        queue.acquire = noted  # type: ignore[method-assign]
        return queue, store, iter(FeatureDataLoader(queue, store))

    head = min(args.samples, args.head_start)
    queue, store, loader = opened()
    deadline = time.monotonic() + 60
    while queue.backend.state().known < head and time.monotonic() < deadline and "error" not in outcome:
        time.sleep(0.05)  # the producer's head start
    trainer = Trainer(result, args.step_seconds, args.scenario_timeout)
    killed = False
    try:
        while not trainer.out_of_time():
            fault.step(result.trained)
            try:
                trainer.wait(next, loader)
            except StopIteration:
                result.waits.pop()  # the pull that found the run closed is after the last step
                break
            if scenario == "kill-trainer" and result.trained == fault.at and not killed:
                killed = True  # dies holding this batch's lease, unacked; a new loader goes on with the run
                threading.Thread(target=_abandon, args=(queue, store), daemon=True).start()
                queue, store, loader = trainer.wait(opened)
                result.note = "restarted"
                continue
            result.samples.append(leased[-1])
            trainer.train()
    finally:
        queue.close()
        store.close()
    thread.join(timeout=args.scenario_timeout + 90)
    producer.close()
    fault.join()
    after = ctx.fleet.counters(PRODUCED)
    result.computed = sum(after.get(url, 0.0) - before.get(url, 0.0) for url in after)
    notes = [result.note, fault.note]
    if result.trained > result.distinct:
        notes.append(f"{result.trained - result.distinct} delivered twice and trained again")
    if "error" in outcome:
        notes.append(f"producer: {type(outcome['error']).__name__}: {str(outcome['error'])[:120]}")
    elif "report" in outcome:
        report = outcome["report"]
        notes.append(f"recomputed {report.recomputed}" if report.recomputed else "")
    result.note = " ".join(n for n in notes if n)
    return result


def _abandon(queue: Any, store: Any) -> None:
    queue.close()
    store.close()


def _row(r: Result, step_s: float) -> str:
    steps = f"{r.longest / step_s:5.1f}" if step_s else "    -"
    return (
        f"{r.way:<11} {r.scenario:<13} {r.distinct:>7} {r.rate:9.2f} {r.waited:7.1%} "
        f"{r.longest:9.2f} {steps:>6} {r.extra:>8}  {r.note}"
    )


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    torch.set_num_threads(1)  # the trainer's process only decodes; the appliances get the cores
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="eagle3-bench-stream-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    load = [os.getloadavg()[0]]
    demand = 1 / args.step_seconds if args.step_seconds else float("inf")
    print(
        f"== stream benchmark: B={BATCH} x T={SEQ_LEN}, D={DRAFT_VOCAB}, {args.samples} samples per run, "
        f"step {args.step_seconds:g} s, 2 appliances (built-in model, CPU, {args.server_threads} thread(s) each); "
        f"prefetch depth {args.depth}, stream read-ahead {args.read_ahead}, head start {args.head_start}, "
        f"visibility timeout {args.visibility_timeout:g} s; logs in {log_dir}",
        flush=True,
    )
    fleet = Fleet(args, log_dir)
    results: list[Result] = []
    try:
        ctx = Context(args, fleet)
        capacity = fleet_capacity(ctx)
        print(
            f"fleet capacity {capacity:.2f} samples/s; trainer demand {demand:.2f} samples/s "
            f"(1 / step); capacity / demand = {capacity / demand:.2f} (the target assumes >= {TARGET_CAPACITY:g})",
            flush=True,
        )
        header = f"{'way':<11} {'scenario':<13} {'trained':>7} {'samples/s':>9} {'waited':>7} "
        header += f"{'longest s':>9} {'steps':>6} {'computed':>8}  notes"
        print(header + "\n" + " " * 70 + "(twice)")
        for scenario in args.scenarios:
            for way in args.ways:
                fleet.heal()
                if way == "stream":
                    result = run_stream(ctx, scenario)
                else:
                    result = run_requests(ctx, scenario, 0 if way == "blocking" else args.depth)
                results.append(result)
                print(_row(result, args.step_seconds), flush=True)
    finally:
        fleet.close()
    load.append(os.getloadavg()[0])
    streams = [r for r in results if r.way == "stream"]
    if streams:
        limit = TARGET_LONGEST_STEPS * args.step_seconds
        print(
            f"target (the stream, every scenario): waited <= {TARGET_WAITED:.0%} of wall time and no wait over "
            f"{TARGET_LONGEST_STEPS:g} steps ({limit:.2f} s), at capacity / demand >= {TARGET_CAPACITY:g} "
            f"(here {capacity / demand:.2f})"
        )
        for r in streams:
            met = r.waited <= TARGET_WAITED and r.longest <= limit and "timed out" not in r.note
            print(f"  {r.scenario:<13} {'met' if met else 'MISSED'} (waited {r.waited:.1%}, longest {r.longest:.2f} s)")
    print(f"load average (1 min) {load[0]:.2f} at the start, {load[1]:.2f} at the end; {os.cpu_count()} CPUs")
    rows = [_summary(r) for r in results]
    meta = {"cpus": os.cpu_count(), "load_average": load, "capacity": capacity, "demand": demand}
    print(json.dumps({"bench": "eagle3-stream", **meta, "args": _jsonable(vars(args)), "results": rows}))
    return 0


def _summary(r: Result) -> dict[str, Any]:
    waits = {"median_wait": statistics.median(r.waits or [0.0]), "longest": r.longest, "waited": r.waited}
    return {
        **asdict(r),
        "waits": None,
        "samples": None,
        **waits,
        "rate": r.rate,
        "extra": r.extra,
        "distinct": r.distinct,
    }


def _jsonable(values: dict[str, Any]) -> dict[str, Any]:
    return {k: str(v) if isinstance(v, Path) else v for k, v in values.items()}


if __name__ == "__main__":
    sys.exit(main())
