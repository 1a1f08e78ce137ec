"""Overload benchmark: served ``/generate`` answers per second in a timeout storm, beside the unloaded rate.

Usage::

    python -m benchmarks.overload                          # 6 clients, B=2 x T=4096, 40 s per scenario
    python -m benchmarks.overload --clients 4 --duration 20

One appliance process (the built-in model) on 127.0.0.1. First its unloaded rate: one client,
one batch at a time (measured again at the end, to show how much the machine's load moved).
Then a timeout storm: ``--clients`` wire clients send large batches (bodies well above 64 KiB)
back to back, with a timeout shorter than the queue they build (by default two unloaded
forwards, while the clients queue one forward each), retrying a timed-out batch up to 3 times
with 1/2/4 s back-off. Three kinds of client, one scenario each:

* ``upstream``: plain httpx as upstream's client behaves (no request id): a retry is a new request;
* ``ours-short``: our client forced to the same short wait; its retries carry a request id;
* ``ours-default``: our client with its defaults (it waits up to the server's ``--request-timeout``).

Each scenario prints the answers the clients received in full per second (no batch starts after
``--duration``; the rate is over the time until the last client stopped) beside the unloaded
rate (the mean of the first and the last measurement), the forwards the server ran for the
scenario and the share of them whose answer reached a client, the queued requests it dropped
because their client had left (``eagle3_generate_abandoned_total``), and the requests it still
had in flight a second after the last client stopped. Everything is bounded: ``--duration``
per scenario, the server's ``--request-timeout`` for any one request.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch
from prometheus_client.parser import text_string_to_metric_families

from eagle3_appliance.launch import ServerProcess
from eagle3_appliance.model.builtin_model import BUILTIN_CONFIG, ensure_builtin_model
from eagle3_client import RemoteEagle3TargetModel, wire
from eagle3_client.synthetic import random_batch, vocab_mapping

__all__ = ["main"]

SCENARIOS = ("upstream", "ours-short", "ours-default")
RETRIES = 3
BACKOFF_S = 1.0
REQUEST_TIMEOUT_S = 120.0  # the server's limit: bounds any one request of the benchmark


@dataclass
class Outcome:
    served: int = 0  # answers received in full within the duration
    gave_up: int = 0  # batches abandoned after every retry
    attempts: int = 0


@dataclass(frozen=True)
class _Result:
    """One scenario's numbers, kept until the final unloaded rate fixes the baseline of its share."""

    scenario: str
    served: int
    gave_up: int
    elapsed: float
    forwards: float
    dropped: float
    inflight: float

    def row(self, baseline: float) -> str:
        rate = self.served / self.elapsed
        return (
            f"{'storm: ' + self.scenario:<26} {rate:6.2f} answers/s   = {rate / baseline:4.0%} of unloaded "
            f"({self.served} served in {self.elapsed:.0f} s, {self.gave_up} given up); "
            f"server: {self.forwards:.0f} forwards "
            f"({self.served / self.forwards if self.forwards else 0:.0%} of them served), "
            f"{self.dropped:.0f} dropped (client gone); "
            f"in flight 1 s after the clients stopped: {self.inflight:.0f}"
        )


def _metrics(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", trust_env=False, timeout=30).text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[sample.name] = out.get(sample.name, 0.0) + sample.value  # labels summed
    return out


def _upstream_client(url: str, body: bytes, timeout: float, deadline: float, outcome: Outcome) -> None:
    """Upstream's behaviour: retry timeouts and connection errors 3 times (1, 2, 4 s), no request id."""
    with httpx.Client(timeout=timeout, trust_env=False) as http:
        while time.monotonic() < deadline:
            for attempt in range(1 + RETRIES):
                outcome.attempts += 1
                try:
                    resp = http.post(url + "/generate", content=body)
                except httpx.TransportError:
                    if attempt < RETRIES and time.monotonic() < deadline:
                        time.sleep(BACKOFF_S * 2**attempt)
                        continue
                    outcome.gave_up += 1
                    break
                if resp.status_code == 200:
                    outcome.served += 1
                break


def _our_client(
    url: str, batch: tuple[torch.Tensor, ...], mapping: tuple[torch.Tensor, torch.Tensor], short: float | None
) -> Callable[[float, Outcome], None]:
    def run(deadline: float, outcome: Outcome) -> None:
        options = {"generate_timeout": short} if short is not None else {}
        with RemoteEagle3TargetModel.from_urls(
            [url], data_plane="wire", max_retries=RETRIES, backoff=BACKOFF_S, **options
        ) as remote:
            remote.set_vocab_mapping(*mapping)
            while time.monotonic() < deadline:
                outcome.attempts += 1
                try:
                    remote.generate_batch(*batch)
                except Exception:  # noqa: BLE001 - a batch given up after its retries
                    outcome.gave_up += 1
                    continue
                outcome.served += 1

    return run


def _storm(clients: int, duration: float, work: Callable[[float, Outcome], None]) -> tuple[list[Outcome], float]:
    """Run ``clients`` threads of ``work`` for ``duration`` s (a batch started before then is finished);
    returns their outcomes and the seconds until the last client stopped."""
    start = time.monotonic()
    deadline = start + duration
    outcomes = [Outcome() for _ in range(clients)]
    threads = [threading.Thread(target=work, args=(deadline, o), daemon=True) for o in outcomes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=duration + REQUEST_TIMEOUT_S + 60)
    return outcomes, time.monotonic() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.overload", description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--draft-vocab", type=int, default=256)
    parser.add_argument("--duration", type=float, default=40.0, help="seconds per storm scenario")
    parser.add_argument("--unloaded", type=int, default=5, help="batches for the unloaded rate")
    parser.add_argument("--timeout", type=float, default=None, help="storm timeout (default: 2 unloaded forwards)")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"comma-separated, of {SCENARIOS}")
    parser.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "eagle3-bench-overload")
    args = parser.parse_args(argv)
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = sorted(set(scenarios) - set(SCENARIOS))
    if unknown:
        parser.error(f"unknown scenario(s) {unknown}")

    vocab = int(BUILTIN_CONFIG["vocab_size"])  # type: ignore[call-overload]
    model_dir = ensure_builtin_model(args.cache_dir)
    batch = random_batch(vocab, args.batch, args.seq_len, seed=0)
    body = wire.encode(dict(zip(("input_ids", "attention_mask", "loss_mask"), batch, strict=True)))
    mapping = vocab_mapping(vocab, args.draft_vocab, seed=0)
    server_args = ["--model", str(model_dir), "--max-seq-len", str(args.seq_len)]
    server_args += ["--request-timeout", str(REQUEST_TIMEOUT_S), "--log-level", "WARNING"]
    print(
        f"== overload benchmark: {args.clients} clients, B={args.batch} T={args.seq_len} "
        f"(request body {len(body) / 1024:.0f} KiB), {args.duration:g} s per scenario"
    )
    with ServerProcess(server_args, log_path=args.cache_dir / "server.log", startup_timeout=600) as server:
        url = server.url
        mapping_body = wire.encode({"selected_token_ids": mapping[0], "selected_token_mask": mapping[1]})
        httpx.post(url + "/set_vocab_mapping", content=mapping_body, trust_env=False, timeout=60).raise_for_status()
        _unloaded_seconds(url, body, 1)  # warm-up
        forward_s = _unloaded_seconds(url, body, args.unloaded)
        unloaded = 1 / forward_s
        timeout = args.timeout if args.timeout is not None else max(1.0, 2 * forward_s)
        print(f"{'unloaded (1 client)':<26} {unloaded:6.2f} answers/s   ({forward_s:.2f} s per batch)")
        print(f"storm timeout {timeout:.1f} s, {RETRIES} retries with {BACKOFF_S:g}/2/4 s back-off")
        results: list[_Result] = []
        for scenario in scenarios:
            if scenario == "upstream":
                work: Callable[[float, Outcome], None] = lambda d, o: _upstream_client(url, body, timeout, d, o)  # noqa: E731
            else:
                work = _our_client(url, batch, mapping, timeout if scenario == "ours-short" else None)
            before = _metrics(url)
            outcomes, elapsed = _storm(args.clients, args.duration, work)
            stopped = time.monotonic()
            time.sleep(1.0)
            after = _metrics(url)
            inflight = after.get("eagle3_inflight_requests", 0.0)
            served = sum(o.served for o in outcomes)
            gave_up = sum(o.gave_up for o in outcomes)
            forwards = after["eagle3_inference_exec_count_total"] - before["eagle3_inference_exec_count_total"]
            dropped = after.get("eagle3_generate_abandoned_total", 0.0) - before.get(
                "eagle3_generate_abandoned_total", 0.0
            )
            results.append(_Result(scenario, served, gave_up, elapsed, forwards, dropped, inflight))
            # Let the server finish whatever the scenario left before the next one starts.
            deadline = stopped + REQUEST_TIMEOUT_S
            while _metrics(url).get("eagle3_inflight_requests", 0.0) > 0 and time.monotonic() < deadline:
                time.sleep(0.5)
        # The machine may have been busier or quieter meanwhile: the unloaded rate once more.
        again = 1 / _unloaded_seconds(url, body, args.unloaded)
    baseline = (unloaded + again) / 2
    for result in results:
        print(result.row(baseline))
    print(f"{'unloaded again, at the end':<26} {again:6.2f} answers/s   (shares above: of the mean, {baseline:.2f})")
    return 0


def _unloaded_seconds(url: str, body: bytes, count: int) -> float:
    """Seconds per batch for one client sending ``count`` batches one after the other."""
    with httpx.Client(timeout=REQUEST_TIMEOUT_S, trust_env=False) as http:
        start = time.monotonic()
        for _ in range(count):
            http.post(url + "/generate", content=body).raise_for_status()
        return (time.monotonic() - start) / count


if __name__ == "__main__":
    raise SystemExit(main())
