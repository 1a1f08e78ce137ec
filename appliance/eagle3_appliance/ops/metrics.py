"""Prometheus metrics for one appliance: requests, ``/generate`` phases, sessions and NVML gauges.

Each app gets its own :class:`~prometheus_client.CollectorRegistry` (never the global
default), so several apps in one process (tests) do not share counters. Names follow
Triton's ``nv_inference_*`` metrics where one has the same meaning, with our ``eagle3_``
prefix and Prometheus base units (seconds, bytes); the GPU gauges carry DCGM's field names
and dcgm-exporter's labels (``gpu``, ``UUID``, ``modelName``) so existing GPU dashboards and
alerts work unchanged. A reading the GPU does not support is left out (absent = unknown).
The full table is in docs/operations.md.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from eagle3_appliance.core.admission import Ticket
from eagle3_appliance.ops.gpu import CLOCKS_EVENT_REASONS, GpuMonitor, GpuReport

__all__ = ["CONTENT_TYPE", "GpuCollector", "Metrics"]

CONTENT_TYPE = prometheus_client.CONTENT_TYPE_LATEST

# From a 1 ms probe to a multi-minute forward of a long batch on a big model.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)

# The label values each labelled counter can take, exported at 0 from the start: a series first
# seen at 1 makes rate() and increase() miss that first event, and a panel or alert on it shows
# "no data" on a healthy server rather than 0.
ABANDON_REASONS = ("client_gone", "timeout")
SESSION_END_REASONS = ("disconnect", "expired", "shutdown")
GROUP_TIERS = ("nccl", "gloo")  # the data planes a /generate may ask for and fall back from

# A ``*_created`` timestamp series per counter only doubles the scrape; nothing here needs it.
prometheus_client.disable_created_metrics()


class GpuCollector(Collector):
    """NVML readings as DCGM-named gauges, from the monitor's cached snapshot (no NVML call per scrape)."""

    def __init__(self, monitor: GpuMonitor) -> None:
        self.monitor = monitor

    def collect(self) -> Iterable[Metric]:
        report: GpuReport = self.monitor.snapshot
        available = GaugeMetricFamily("eagle3_nvml_available", "1 when NVML answers on this machine, else 0.")
        available.add_metric([], 1.0 if report.nvml else 0.0)
        yield available
        labels = ["gpu", "UUID", "modelName"]
        gauges: dict[str, tuple[str, Callable[[Any], float | None]]] = {
            "DCGM_FI_DEV_GPU_TEMP": ("GPU temperature (in C).", lambda g: g.temperature_c),
            "DCGM_FI_DEV_POWER_USAGE": ("Power draw (in W).", lambda g: g.power_draw_w),
            "DCGM_FI_DEV_ENFORCED_POWER_LIMIT": ("Enforced power limit (in W).", lambda g: g.power_limit_w),
            "DCGM_FI_DEV_FB_USED": ("Framebuffer memory used (in MiB).", lambda g: _mib(g.memory_used_bytes)),
            "DCGM_FI_DEV_FB_FREE": (
                "Framebuffer memory free (in MiB).",
                lambda g: (
                    None
                    if g.memory_used_bytes is None or g.memory_total_bytes is None
                    else _mib(g.memory_total_bytes - g.memory_used_bytes)
                ),
            ),
            "DCGM_FI_DEV_FB_TOTAL": ("Framebuffer memory total (in MiB).", lambda g: _mib(g.memory_total_bytes)),
            "DCGM_FI_DEV_GPU_UTIL": ("GPU utilization (in %).", lambda g: g.utilization_gpu_percent),
            "DCGM_FI_DEV_MEM_COPY_UTIL": ("Memory utilization (in %).", lambda g: g.utilization_memory_percent),
            "DCGM_FI_DEV_CLOCKS_EVENT_REASONS": (
                "Current clocks event (throttle) reasons, NVML bit mask.",
                lambda g: g.clocks_event_reasons_mask,
            ),
            "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL": (
                "Volatile uncorrected (double-bit) ECC errors since the driver loaded.",
                lambda g: g.ecc_uncorrected_volatile,
            ),
            "DCGM_FI_DEV_ROW_REMAP_PENDING": (
                "1 when a row remap waits for a GPU reset.",
                lambda g: None if g.remapped_rows_pending is None else float(g.remapped_rows_pending),
            ),
            "DCGM_FI_DEV_ROW_REMAP_FAILURE": (
                "1 when row remapping has failed.",
                lambda g: None if g.remapped_rows_failure is None else float(g.remapped_rows_failure),
            ),
            "DCGM_FI_DEV_XID_ERRORS": (
                "Value of the last XID seen since the server started (0 = none).",
                lambda g: float(g.xid_events[-1].xid) if g.xid_events else (0.0 if g.xid_watch else None),
            ),
        }
        for name, (help_text, read) in gauges.items():
            family = GaugeMetricFamily(name, help_text, labels=labels)
            for gpu in report.gpus:
                value = read(gpu)
                if value is not None:
                    family.add_metric(_gpu_labels(gpu), float(value))
            yield family
        reasons = GaugeMetricFamily(
            "eagle3_gpu_clocks_event_reason",
            "1 while the named clocks event (throttle) reason is active.",
            labels=[*labels, "reason"],
        )
        fatal = GaugeMetricFamily(
            "eagle3_gpu_fatal", "1 when this GPU has a fatal condition (see /gpus and /health/ready).", labels=labels
        )
        xids = CounterMetricFamily(
            "eagle3_gpu_xid_errors", "XID events seen since the server started.", labels=[*labels, "xid"]
        )
        for gpu in report.gpus:
            lab = _gpu_labels(gpu)
            if gpu.clocks_event_reasons_mask is not None:
                for bit, reason in CLOCKS_EVENT_REASONS:
                    reasons.add_metric([*lab, reason], 1.0 if gpu.clocks_event_reasons_mask & bit else 0.0)
            fatal.add_metric(lab, 1.0 if gpu.fatal_reasons() else 0.0)
            for xid, n in sorted(gpu.xid_counts.items()):  # every event, also those no longer kept
                xids.add_metric([*lab, str(xid)], float(n))
        yield reasons
        yield fatal
        yield xids


def _mib(nbytes: int | None) -> float | None:
    return None if nbytes is None else nbytes / (1024 * 1024)


def _gpu_labels(gpu: Any) -> list[str]:
    return [str(gpu.index), gpu.uuid or "", gpu.name or ""]


class Metrics:
    """The appliance's metrics; record through the methods, read with :meth:`exposition`."""

    def __init__(
        self,
        *,
        monitor: GpuMonitor,
        inflight: Callable[[], int],
        queued: Callable[[], int],
        computing: Callable[[], int],
        clients: Callable[[], int],
        ready: Callable[[], bool],
        draining: Callable[[], bool],
    ) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.request_success = Counter(
            "eagle3_request_success", "Requests answered with a 2xx/3xx status.", ["endpoint"], registry=r
        )
        self.request_failure = Counter(
            "eagle3_request_failure",
            "Requests that failed: status is the HTTP code, or 'aborted' when the client went away.",
            ["endpoint", "status"],
            registry=r,
        )
        self.request_duration = Histogram(
            "eagle3_request_duration_seconds",
            "Time from routing to the end of the response body, per endpoint.",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.phase = {
            phase: Histogram(
                f"eagle3_inference_{phase}_duration_seconds",
                f"/generate time spent in the {phase} phase ({what}).",
                buckets=LATENCY_BUCKETS,
                registry=r,
            )
            for phase, what in (
                ("queue", "waiting for the model thread"),
                ("forward", "target forward and draft-vocabulary projection"),
                ("encode", "device-to-host copy and wire headers"),
                ("send", "writing the answer to the socket"),
            )
        }
        self.inference_count = Counter(
            "eagle3_inference_count", "Sequences supervised (batch rows of successful /generate).", registry=r
        )
        self.exec_count = Counter(
            "eagle3_inference_exec_count",
            "Target forwards run for /generate (a micro-batched forward counts once).",
            registry=r,
        )
        self.abandoned = Counter(
            "eagle3_generate_abandoned",
            "/generate requests dropped before their forward because nobody waited for the answer any more: "
            "reason is client_gone (the client closed its connection) or timeout (--request-timeout ran out).",
            ["reason"],
            registry=r,
        )
        for reason in ABANDON_REASONS:
            self.abandoned.labels(reason)
        self.fallbacks = Counter(
            "eagle3_dataplane_fallbacks",
            "/generate answers sent on the wire because the data plane the client asked for had no working "
            "group: requested is nccl or gloo (the group's tier), or group (the session has no group left).",
            ["requested"],
            registry=r,
        )
        for tier in GROUP_TIERS:
            self.fallbacks.labels(tier)
        self.tokens = Counter(
            "eagle3_inference_tokens", "Token positions supervised (batch x sequence length).", registry=r
        )
        self.bytes_sent = Counter(
            "eagle3_response_bytes",
            "Supervision bytes sent, per data plane and encoding.",
            ["data_plane", "encoding"],
            registry=r,
        )
        self.captures = Counter(
            "eagle3_generate_captures",
            "/generate answers sent, per capture: eagle3 (aux layers, draft-vocabulary supervision), "
            "dflash (a chosen layer set) or dflash+logits (with the full-vocabulary logits).",
            ["capture"],
            registry=r,
        )
        self.sessions_registered = Counter("eagle3_sessions_registered", "Client sessions registered.", registry=r)
        self.readmissions = Counter(
            "eagle3_fleet_readmissions",
            "Sessions registered by a client taking this server back into its rotation after it had left it.",
            registry=r,
        )
        self.failovers = Counter(
            "eagle3_fleet_failover_requests",
            "/generate requests a client re-sent here after another server failed them.",
            registry=r,
        )
        self.session_ends = Counter(
            "eagle3_session_ends",
            "Client sessions ended: disconnect, expired (missed its lease) or shutdown.",
            ["reason"],
            registry=r,
        )
        for reason in SESSION_END_REASONS:
            self.session_ends.labels(reason)
        gauges = (
            ("eagle3_inflight_requests", "/generate requests admitted and not finished.", inflight),
            ("eagle3_inference_pending_request_count", "/generate requests waiting for the model thread.", queued),
            ("eagle3_inference_computing", "/generate requests on the model thread now (0 or 1).", computing),
            ("eagle3_connected_clients", "Registered client sessions (upstream clients are not counted).", clients),
            ("eagle3_ready", "1 when /health/ready answers 200.", lambda: float(ready())),
            (
                "eagle3_draining",
                "1 while the server finishes in-flight work before exiting.",
                lambda: float(draining()),
            ),
        )
        for name, help_text, fn in gauges:
            Gauge(name, help_text, registry=r).set_function(fn)
        self.target_info = Gauge(
            "eagle3_target_info",
            "1 for how the target runs: mode single, device_map or tp=N (tensor parallel, not bit-exact); "
            "its loader and attention implementation.",
            ["mode", "loader", "attn_implementation"],
            registry=r,
        )
        self.intra_op_threads = Gauge(
            "eagle3_intra_op_threads",
            "Threads torch's CPU kernels use in each forward, read on the model thread (--intra-op-threads).",
            registry=r,
        )
        self.limit = Gauge(
            "eagle3_limit",
            "The limits this server enforces (max_queue, max_sessions, max_connections, max_body_bytes, "
            "max_pending_body_bytes, max_seq_len, max_batch_tokens), for saturation ratios.",
            ["limit"],
            registry=r,
        )
        r.register(GpuCollector(monitor))
        # The stream (eagle3_appliance.stream): answers kept resident for runs, and the run queues
        # this appliance hosts (appliance://). Queue series are per run (a few runs at a time).
        self.stream_produced = Counter(
            "eagle3_stream_produced", "Answers computed and kept resident for a run's stream.", registry=r
        )
        self.stream_claimed = Counter(
            "eagle3_stream_claimed",
            "Kept answers sent to a trainer that claimed them (a redelivered sample counts each time).",
            registry=r,
        )
        self.stream_released = Counter(
            "eagle3_stream_released",
            "Kept answers dropped: acked (their sample was consumed) or run_ended (the run was deleted).",
            ["reason"],
            registry=r,
        )
        for reason in ("acked", "run_ended"):
            self.stream_released.labels(reason)
        self.stream_refused = Counter(
            "eagle3_stream_refused",
            "Answers a producer asked for while the resident answers were at the high watermark (it paused).",
            registry=r,
        )
        self.stream_resident = Gauge(
            "eagle3_stream_resident", "Answers kept resident now: bytes and samples.", ["unit"], registry=r
        )
        self.stream_watermark = Gauge(
            "eagle3_stream_watermark_bytes",
            "The resident-answer watermarks: high (producers are refused at it) and low (they resume below it).",
            ["level"],
            registry=r,
        )
        self.stream_paused = Gauge(
            "eagle3_stream_paused",
            "1 while producers are refused: the high watermark was reached and the low one not yet.",
            registry=r,
        )
        self.stream_queue = Gauge(
            "eagle3_stream_queue_samples",
            "Samples of each run queue hosted here, by state: pending, leased, acked.",
            ["run", "state"],
            registry=r,
        )
        self.stream_queue_events = Counter(
            "eagle3_stream_queue_events",
            "Events of each run queue hosted here: redelivered (a lease expired or failed), recomputed (a "
            "sample moved to another appliance), empty (a lease asked for while nothing was ready: a waiting "
            "trainer), refused (a reference of another model).",
            ["run", "event"],
            registry=r,
        )

    def describe_limits(self, limits: Mapping[str, Callable[[], float]]) -> None:
        """Export each limit through a callable (read at scrape time: some change after start-up)."""
        for name, read in limits.items():
            self.limit.labels(name).set_function(read)

    def describe_target(self, mode: str, loader: str, attn_implementation: str) -> None:
        """Set ``eagle3_target_info`` (once, when the app is built around its target)."""
        self.target_info.clear()
        self.target_info.labels(mode, loader, attn_implementation).set(1)

    def observe_request(self, endpoint: str, status: int | str, seconds: float | None) -> None:
        if isinstance(status, int) and status < 400:
            self.request_success.labels(endpoint).inc()
        else:
            self.request_failure.labels(endpoint, str(status)).inc()
        if seconds is not None:
            self.request_duration.labels(endpoint).observe(seconds)

    def observe_generate(self, ticket: Ticket, *, sequences: int, tokens: int) -> None:
        """A successful /generate: its phase times, its sequences and tokens (forwards count in ``exec_count``)."""
        for phase, seconds in ticket.phases().items():
            self.phase[phase].observe(seconds)
        self.inference_count.inc(sequences)
        self.tokens.inc(tokens)

    def record_sent(self, data_plane: str, encoding: str, nbytes: int) -> None:
        """Supervision bytes that left on a data plane (called by every data plane's send path)."""
        self.bytes_sent.labels(data_plane, encoding).inc(nbytes)

    def record_fallback(self, requested: str) -> None:
        """A /generate that asked for ``requested`` (nccl or gloo) and was answered on the wire."""
        self.fallbacks.labels(requested).inc()

    def exposition(self) -> bytes:
        return prometheus_client.generate_latest(self.registry)
