"""The end of a run: custom metrics, the server's ``/metrics``, the verdict and the exit code.

At ``quitting`` on the master (or the only process), after the workers' last reports:

* the custom metrics are summed up and logged, and everything goes to ``--report-file``;
* the server's ``/metrics`` is saved to ``--server-metrics-file`` if it answers 200;
* a capacity search draws its steps (answers/s, p50 / p99 against ranks, the knee) as
  ``<--csv prefix>_capacity.png``;
* the verdict sets the exit code. Any wrong answer, error in user code, or failed request
  other than the ranks' ``/generate`` fails the run, as does a ``/generate`` error rate or
  p95 over ``--max-error-rate``/``--max-p95-ms`` or no successful ``/generate`` at all. A
  capacity search instead passes when its first step passed: failures at the step where
  the server breaks are what it is looking for.
"""

from __future__ import annotations

import json
import logging
import os
import time
import urllib.error
import urllib.request
from typing import Any

from locust import events
from locust.env import Environment
from locust.runners import WorkerRunner

from eagle3_client import protocol
from eagle3_loadtest._capacity import StepCapacityShape
from eagle3_loadtest._metrics import COUNTERS, GENERATE, generate_entry
from eagle3_loadtest._options import RunSettings
from eagle3_loadtest._plot import plot_path, save_capacity_plot
from eagle3_loadtest._scenario import SELECTION

__all__ = ["build_report", "fetch_server_metrics"]

logger = logging.getLogger(__name__)

_METRICS_TIMEOUT_S = 10.0


def fetch_server_metrics(host: str, settings: RunSettings) -> dict[str, Any]:
    """GET ``/metrics`` and save it; 404 (a server without metrics) is recorded, not an error."""
    url = host.rstrip("/") + protocol.path(protocol.EP_METRICS)
    headers = {protocol.AUTH_HEADER: f"Bearer {settings.auth_token}"} if settings.auth_token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=_METRICS_TIMEOUT_S) as r:
            text = r.read()
    except urllib.error.HTTPError as exc:
        return {"status": exc.code, "file": None}
    except (OSError, ValueError) as exc:
        return {"status": None, "error": str(exc), "file": None}
    path = settings.server_metrics_file or None
    if path:
        _write(path, text)
    return {"status": 200, "file": path, "bytes": len(text)}


def _write(path: str, data: bytes) -> None:
    if folder := os.path.dirname(path):
        os.makedirs(folder, exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def _generate_stats(environment: Environment) -> dict[str, Any]:
    entry = generate_entry(environment.runner.stats) if environment.runner else None
    if entry is None or not entry.num_requests:
        return {"requests": 0, "failures": 0, "fail_ratio": 0.0, "p50_ms": None, "p95_ms": None, "rps": 0.0}
    return {
        "requests": entry.num_requests,
        "failures": entry.num_failures,
        "fail_ratio": entry.fail_ratio,
        "avg_ms": entry.avg_response_time,
        "p50_ms": entry.get_response_time_percentile(0.5),
        "p95_ms": entry.get_response_time_percentile(0.95),
        "p99_ms": entry.get_response_time_percentile(0.99),
        "rps": entry.total_rps,
        "avg_response_bytes": entry.avg_content_length,
    }


def _verdict(
    environment: Environment, settings: RunSettings, generate: dict[str, Any], capacity: dict[str, Any] | None
) -> list[str]:
    """Reasons the run failed (empty: it passed)."""
    assert environment.runner is not None
    reasons = []
    if COUNTERS.invalid:
        reasons.append(f"{COUNTERS.invalid} /generate answers were wrong (see the failures)")
    if environment.runner.exceptions:
        reasons.append(f"{len(environment.runner.exceptions)} kinds of exception in user code")
    if capacity is not None:
        if capacity["capacity_users"] < 1:
            reasons.append(f"no capacity step passed ({capacity['stopped_because']})")
        return reasons
    for (name, method), entry in environment.runner.stats.entries.items():
        if name != GENERATE and entry.num_failures:
            reasons.append(f"{entry.num_failures} of {entry.num_requests} {method} {name} failed")
    if generate["requests"] - generate["failures"] <= 0:
        reasons.append("no /generate call succeeded")
    elif generate["fail_ratio"] > settings.max_error_rate:
        reasons.append(f"/generate error rate {generate['fail_ratio']:.4f} > {settings.max_error_rate:g}")
    if settings.max_p95_ms and generate["p95_ms"] is not None and generate["p95_ms"] > settings.max_p95_ms:
        reasons.append(f"/generate p95 {generate['p95_ms']:.0f} ms > {settings.max_p95_ms:g} ms")
    return reasons


def build_report(environment: Environment) -> dict[str, Any]:
    """Everything the JSON report holds; also fetches the server's /metrics."""
    assert environment.runner is not None and environment.parsed_options is not None
    settings = RunSettings.from_options(environment.parsed_options)
    total = environment.runner.stats.total
    elapsed = max(0.0, (total.last_request_timestamp or total.start_time) - total.start_time)
    generate = _generate_stats(environment)
    shape = environment.shape_class
    capacity = shape.search.summary() if isinstance(shape, StepCapacityShape) and shape.search else None
    reasons = _verdict(environment, settings, generate, capacity)
    errors = sorted(environment.runner.stats.errors.values(), key=lambda e: -e.occurrences)[:10]
    return {
        "scenario": SELECTION.scenario,
        "host": environment.host,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "options": {
            "batch_size": settings.batch_size,
            "seq_len": environment.parsed_options.seq_len,
            "max_seq_len": settings.lengths.max_len,
            "padding": settings.padding,
            "draft_vocab": settings.draft_vocab,
            "encoding": settings.encoding,
            "stream_queue": settings.stream_queue or None,
            "stream_run_id": settings.stream_run_id or None,
        },
        "custom_metrics": COUNTERS.summary(elapsed),
        "generate": generate,
        "capacity": capacity,
        "errors": [
            {"method": e.method, "name": e.name, "error": e.error, "occurrences": e.occurrences} for e in errors
        ],
        "server_metrics": fetch_server_metrics(environment.host or "", settings) if environment.host else None,
        "verdict": {
            "passed": not reasons,
            "reasons": reasons,
            "limits": {"max_p95_ms": settings.max_p95_ms, "max_error_rate": settings.max_error_rate},
        },
    }


def _log(report: dict[str, Any]) -> None:
    m = report["custom_metrics"]
    if m["responses"]:
        logger.info(
            "supervision: %d valid answers, %.0f bytes/answer, %.1f bytes/token, %.0f tokens/s (%.0f unpadded)",
            m["responses"],
            m["response_bytes_mean"],
            m["supervision_bytes_per_token"],
            m["tokens_per_second"] or 0.0,
            m["real_tokens_per_second"] or 0.0,
        )
    if report["capacity"] is not None:
        cap = report["capacity"]
        for step in cap["steps"]:
            logger.info(
                "  step %3d users: %5d requests, p95 %s ms, error rate %s: %s",
                step["users"],
                step["requests"],
                step["p95_ms"],
                step["error_rate"],
                step["reason"],
            )
        logger.info("capacity: %d users (%s)", cap["capacity_users"], cap["stopped_because"])
    verdict = report["verdict"]
    if verdict["passed"]:
        logger.info("verdict: passed")
    else:
        logger.error("verdict: FAILED: %s", "; ".join(verdict["reasons"]))


@events.quitting.add_listener
def _on_quitting(environment: Environment, **_kw: Any) -> None:
    if isinstance(environment.runner, WorkerRunner) or environment.runner is None:
        return
    report = build_report(environment)
    _log(report)
    assert environment.parsed_options is not None
    path = RunSettings.from_options(environment.parsed_options).report_file
    capacity = report["capacity"]
    plot = plot_path(getattr(environment.parsed_options, "csv_prefix", None), path)
    if capacity is not None and capacity["steps"] and plot is not None:
        capacity["plot"] = str(save_capacity_plot(capacity, plot, f"capacity search against {environment.host}"))
        logger.info("capacity plot written to %s", plot)
    if path:
        _write(path, json.dumps(report, indent=2, default=str).encode())
        logger.info("report written to %s", path)
    environment.process_exit_code = 0 if report["verdict"]["passed"] else 1
