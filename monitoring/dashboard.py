"""The Grafana dashboard for one appliance or a fleet, built with Grafana's own Python SDK.

Every query selects ``job=~"$job", instance=~"$instance"``: pick one server to look at it
alone, or all of them for the fleet (most panels then draw one line per instance). Counters
are read with ``rate(...[$__rate_interval])``, the window Grafana sizes to the scrape
interval. Regenerate the committed JSON after a change (``tests/test_monitoring.py`` fails
until you do)::

    python -m monitoring.dashboard > monitoring/grafana/eagle3-appliance.json
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass

from grafana_foundation_sdk.builders import common as common_b
from grafana_foundation_sdk.builders import dashboard as dash
from grafana_foundation_sdk.builders import prometheus, stat, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models.dashboard import DashboardCursorSync, DataSourceRef, VariableRefresh, VariableSort

__all__ = ["ROWS", "UID", "Panel", "build", "main", "render"]

UID = "eagle3-appliance"
DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
RATE = "$__rate_interval"
GENERATE = 'endpoint="generate"'


def sel(extra: str = "") -> str:
    """The dashboard's selector ``{job=~"$job", instance=~"$instance"}``, with more matchers."""
    return '{job=~"$job", instance=~"$instance"' + (", " + extra if extra else "") + "}"


def rate(metric: str, extra: str = "", by: str = "instance") -> str:
    return f"sum by ({by}) (rate({metric}{sel(extra)}[{RATE}]))"


def quantile(q: float, metric: str, extra: str = "", by: str = "instance") -> str:
    return f"histogram_quantile({q}, sum by ({by}, le) (rate({metric}_bucket{sel(extra)}[{RATE}])))"


@dataclass(frozen=True)
class Panel:
    """One panel: its title, the question it answers, its queries (expression, legend) and unit."""

    title: str
    description: str
    queries: tuple[tuple[str, str], ...]
    unit: str = "short"
    stat: bool = False  # a single number rather than a graph
    width: int = 8
    stack: bool = False


PHASES = ("queue", "forward", "encode", "send")

ROWS: tuple[tuple[str, tuple[Panel, ...]], ...] = (
    (
        "Fleet",
        (
            Panel(
                "Servers up / ready / draining",
                "Targets Prometheus scrapes (up), servers whose /health/ready answers 200, servers draining.",
                (
                    (f"sum(up{sel()})", "up"),
                    (f"sum(eagle3_ready{sel()})", "ready"),
                    (f"sum(eagle3_draining{sel()})", "draining"),
                ),
                stat=True,
                width=6,
            ),
            Panel(
                "Answers / s (all selected)",
                "/generate answers per second, summed over the selected servers.",
                ((f"sum(rate(eagle3_request_success_total{sel(GENERATE)}[{RATE}]))", "answers/s"),),
                unit="reqps",
                stat=True,
                width=6,
            ),
            Panel(
                "Tokens / s (all selected)",
                "Token positions supervised per second (batch x sequence length), summed.",
                ((f"sum(rate(eagle3_inference_tokens_total{sel()}[{RATE}]))", "tokens/s"),),
                stat=True,
                width=6,
            ),
            Panel(
                "Target mode",
                "How each target runs: single, device_map, or tp=N (tensor parallel, not bit-exact); its loader.",
                ((f"max by (instance, mode, loader) (eagle3_target_info{sel()})", "{{instance}} {{mode}} {{loader}}"),),
                stat=True,
                width=6,
            ),
        ),
    ),
    (
        "Throughput",
        (
            Panel(
                "Answers / s",
                "/generate answers per second, per server.",
                ((rate("eagle3_request_success_total", GENERATE), "{{instance}}"),),
                unit="reqps",
            ),
            Panel(
                "Tokens / s",
                "Token positions supervised per second, per server.",
                ((rate("eagle3_inference_tokens_total"), "{{instance}}"),),
            ),
            Panel(
                "Sequences and forwards / s",
                "Sequences supervised and target forwards run per second (micro-batching runs fewer forwards).",
                (
                    (rate("eagle3_inference_count_total"), "{{instance}} sequences"),
                    (rate("eagle3_inference_exec_count_total"), "{{instance}} forwards"),
                ),
            ),
        ),
    ),
    (
        "Latency",
        (
            Panel(
                "/generate latency p50 / p99",
                "Routing to the end of the response body, per server.",
                (
                    (quantile(0.5, "eagle3_request_duration_seconds", GENERATE), "{{instance}} p50"),
                    (quantile(0.99, "eagle3_request_duration_seconds", GENERATE), "{{instance}} p99"),
                ),
                unit="s",
            ),
            Panel(
                "p99 by phase",
                "Where /generate time goes: queue (waiting for the model thread), forward, encode, send.",
                tuple(
                    (quantile(0.99, f"eagle3_inference_{phase}_duration_seconds", by="job"), f"{phase} p99")
                    for phase in PHASES
                ),
                unit="s",
            ),
            Panel(
                "Mean time by phase",
                "Mean seconds per /generate in each phase, stacked: their sum is the mean /generate time.",
                tuple(
                    (
                        f"sum(rate(eagle3_inference_{phase}_duration_seconds_sum{sel()}[{RATE}])) / "
                        f"sum(rate(eagle3_inference_{phase}_duration_seconds_count{sel()}[{RATE}]))",
                        phase,
                    )
                    for phase in PHASES
                ),
                unit="s",
                stack=True,
            ),
        ),
    ),
    (
        "Queue and connections",
        (
            Panel(
                "Queue depth / limit",
                "/generate waiting for the model thread, against --max-queue (503 + Retry-After beyond).",
                (
                    (f"sum by (instance) (eagle3_inference_pending_request_count{sel()})", "{{instance}} queued"),
                    ("max by (instance) (eagle3_limit" + sel('limit="max_queue"') + ")", "{{instance}} max_queue"),
                ),
            ),
            Panel(
                "In flight",
                "/generate admitted and not finished, and those on the model thread now.",
                (
                    (f"sum by (instance) (eagle3_inflight_requests{sel()})", "{{instance}} in flight"),
                    (f"sum by (instance) (eagle3_inference_computing{sel()})", "{{instance}} computing"),
                ),
            ),
            Panel(
                "Open connections, pending body bytes",
                "Open client connections (right: declared bytes of request bodies being received or held).",
                (
                    (f"sum by (instance) (eagle3_open_connections{sel()})", "{{instance}} connections"),
                    (f"sum by (instance) (eagle3_pending_body_bytes{sel()})", "{{instance}} pending body bytes"),
                ),
            ),
        ),
    ),
    (
        "Rejections and errors",
        (
            Panel(
                "Failed requests / s by status",
                "Requests answered >= 400 (or aborted: the client vanished), by endpoint and status.",
                ((rate("eagle3_request_failure_total", by="endpoint, status"), "{{endpoint}} {{status}}"),),
                unit="reqps",
                stack=True,
            ),
            Panel(
                "Refusals / s by reason",
                "Connections and requests refused by a limit (connections, probe_only, body_budget); "
                "connections closed at a deadline (headers, body); idle connections evicted.",
                (
                    (rate("eagle3_connections_refused_total", by="reason"), "refused {{reason}}"),
                    (rate("eagle3_connections_timed_out_total", by="phase"), "timed out {{phase}}"),
                    (f"sum(rate(eagle3_connections_evicted_total{sel()}[{RATE}]))", "evicted"),
                ),
                unit="reqps",
            ),
            Panel(
                "Abandoned /generate / s",
                "/generate dropped before their forward: client_gone or timeout (--request-timeout).",
                ((rate("eagle3_generate_abandoned_total", by="reason"), "{{reason}}"),),
                unit="reqps",
            ),
        ),
    ),
    (
        "Data planes",
        (
            Panel(
                "Bytes / s by data plane",
                "Supervision bytes sent, per data plane (wire, gloo, nccl) and encoding.",
                ((rate("eagle3_response_bytes_total", by="data_plane, encoding"), "{{data_plane}} {{encoding}}"),),
                unit="Bps",
                stack=True,
            ),
            Panel(
                "Fallbacks and failovers / s",
                "Answers sent on the wire because the requested group (nccl, gloo) had none working; "
                "requests re-sent here after another server failed them; clients taking a server back.",
                (
                    (rate("eagle3_dataplane_fallbacks_total", by="requested"), "fallback from {{requested}}"),
                    (f"sum(rate(eagle3_fleet_failover_requests_total{sel()}[{RATE}]))", "failovers"),
                    (f"sum(rate(eagle3_fleet_readmissions_total{sel()}[{RATE}]))", "readmissions"),
                ),
                unit="reqps",
            ),
            Panel(
                "Sessions and leases",
                "Registered client sessions, and sessions ending per minute by reason "
                "(expired = a client missed its lease).",
                (
                    (f"sum by (instance) (eagle3_connected_clients{sel()})", "{{instance}} sessions"),
                    (f"60 * {rate('eagle3_session_ends_total', by='reason')}", "ends/min {{reason}}"),
                    (f"60 * sum(rate(eagle3_sessions_registered_total{sel()}[{RATE}]))", "registered/min"),
                ),
            ),
        ),
    ),
    (
        "Stream",
        (
            Panel(
                "Resident answers / watermarks",
                "Bytes of answers kept resident for runs' streams, against the high watermark (producers are "
                "refused at it, --stream-memory-mb) and the low one (they resume below it).",
                (
                    ("sum by (instance) (eagle3_stream_resident" + sel('unit="bytes"') + ")", "{{instance}} resident"),
                    (
                        "max by (instance) (eagle3_stream_watermark_bytes" + sel('level="high"') + ")",
                        "{{instance}} high",
                    ),
                    ("max by (instance) (eagle3_stream_watermark_bytes" + sel('level="low"') + ")", "{{instance}} low"),
                ),
                unit="bytes",
            ),
            Panel(
                "Resident samples",
                "Samples whose answers are kept here until a trainer acks them or their run ends.",
                (("sum by (instance) (eagle3_stream_resident" + sel('unit="samples"') + ")", "{{instance}}"),),
            ),
            Panel(
                "Producers paused, refusals / s",
                "1 while producers are refused (the high watermark was reached, the low one not yet), and the "
                "answers refused per second: trainers do not ack, the watermark is too low, or trainers are gone.",
                (
                    (f"max by (instance) (eagle3_stream_paused{sel()})", "{{instance}} paused"),
                    (rate("eagle3_stream_refused_total"), "{{instance}} refused/s"),
                ),
            ),
            Panel(
                "Produced / claimed / released / s",
                "Answers computed and kept, sent to trainers that claimed them (a redelivered sample counts each "
                "time), and dropped: acked (consumed) or run_ended.",
                (
                    (rate("eagle3_stream_produced_total"), "{{instance}} produced"),
                    (rate("eagle3_stream_claimed_total"), "{{instance}} claimed"),
                    (rate("eagle3_stream_released_total", by="instance, reason"), "{{instance}} released {{reason}}"),
                ),
            ),
            Panel(
                "Queue samples by state",
                "Samples of each run queue hosted here (appliance://): pending (ready to lease), leased, acked.",
                ((f"sum by (run, state) (eagle3_stream_queue_samples{sel()})", "{{run}} {{state}}"),),
            ),
            Panel(
                "Queue events / s",
                "Per run: redelivered (a lease expired or failed), recomputed (a sample moved to another "
                "appliance), empty (a trainer asked for a lease and nothing was ready: it waited), refused "
                "(a reference of another model).",
                ((rate("eagle3_stream_queue_events_total", by="run, event"), "{{run}} {{event}}"),),
            ),
        ),
    ),
    (
        "GPU",
        (
            Panel(
                "GPU utilisation",
                "NVML GPU utilisation per GPU (DCGM field names: dcgm-exporter dashboards work too).",
                ((f"max by (instance, gpu) (DCGM_FI_DEV_GPU_UTIL{sel()})", "{{instance}} gpu{{gpu}}"),),
                unit="percent",
            ),
            Panel(
                "GPU memory used",
                "Framebuffer used as a share of the total, per GPU.",
                (
                    (
                        f"max by (instance, gpu) (DCGM_FI_DEV_FB_USED{sel()}) / "
                        f"max by (instance, gpu) (DCGM_FI_DEV_FB_TOTAL{sel()})",
                        "{{instance}} gpu{{gpu}}",
                    ),
                ),
                unit="percentunit",
            ),
            Panel(
                "GPU temperature and power",
                "Temperature (C) and power draw (W) per GPU.",
                (
                    (f"max by (instance, gpu) (DCGM_FI_DEV_GPU_TEMP{sel()})", "{{instance}} gpu{{gpu}} C"),
                    (f"max by (instance, gpu) (DCGM_FI_DEV_POWER_USAGE{sel()})", "{{instance}} gpu{{gpu}} W"),
                ),
            ),
            Panel(
                "XID events since start",
                "XID events per GPU and code since the server started (a step is a new event; a code's series "
                "starts at its first event); fatal ones (79, 48, 74, ...) make the server not ready.",
                (
                    (
                        f"sum by (instance, gpu, xid) (eagle3_gpu_xid_errors_total{sel()})",
                        "{{instance}} gpu{{gpu}} xid {{xid}}",
                    ),
                ),
            ),
            Panel(
                "Fatal GPUs, throttling",
                "GPUs with a fatal condition (see /gpus), and active clock-event (throttle) reasons.",
                (
                    (f"sum by (instance) (eagle3_gpu_fatal{sel()})", "{{instance}} fatal GPUs"),
                    (f"sum by (instance, reason) (eagle3_gpu_clocks_event_reason{sel()})", "{{instance}} {{reason}}"),
                ),
            ),
            Panel(
                "NVML available",
                "1 when NVML answers on the server's machine (0 on a CPU-only server: the GPU panels stay empty).",
                ((f"min by (instance) (eagle3_nvml_available{sel()})", "{{instance}}"),),
            ),
        ),
    ),
)


def _panel(panel: Panel, panel_id: int) -> timeseries.Panel | stat.Panel:
    built: timeseries.Panel | stat.Panel = stat.Panel() if panel.stat else timeseries.Panel()
    built.id(panel_id).title(panel.title).description(panel.description).unit(panel.unit).span(panel.width).height(8)
    built.datasource(DATASOURCE)
    for i, (expr, legend) in enumerate(panel.queries):
        built.with_target(
            prometheus.Dataquery().expr(expr).legend_format(legend).ref_id(chr(ord("A") + i)).datasource(DATASOURCE)
        )
    if isinstance(built, stat.Panel):
        built.reduce_options(common_b.ReduceDataOptions().calcs(["lastNotNull"]).values(False)).graph_mode(
            common.BigValueGraphMode.AREA
        )
    else:
        built.legend(
            common_b.VizLegendOptions()
            .display_mode(common.LegendDisplayMode.TABLE)  # type: ignore[arg-type]  # StrEnum: mypy reads 3.10
            .placement(common.LegendPlacement.BOTTOM)
            .show_legend(True)
            .calcs(["lastNotNull", "max"])
        ).fill_opacity(20 if panel.stack else 5)
        if panel.stack:
            built.stacking(common_b.StackingConfig().mode(common.StackingMode.NORMAL))  # type: ignore[arg-type]
    return built


def build() -> dash.Dashboard:
    """The dashboard: variables for the data source, the job and the instances, then one row per concern."""
    board: dash.Dashboard = (
        dash.Dashboard("EAGLE-3 appliance")
        .uid(UID)
        .description("One EAGLE-3 target server or a fleet of them: throughput, latency, queue, errors, stream, GPUs.")
        .tags(["eagle3", "appliance"])
        .editable()
        .tooltip(DashboardCursorSync.CROSSHAIR)
        .time("now-1h", "now")
        .refresh("30s")
        .timezone("browser")
        .with_variable(dash.DatasourceVariable("datasource").label("Data source").type("prometheus"))
        .with_variable(
            dash.QueryVariable("job")
            .label("Job")
            .datasource(DATASOURCE)
            .query("label_values(eagle3_ready, job)")
            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
            .sort(VariableSort.ALPHABETICAL_ASC)
            .include_all(True)
            .all_value(".*")
        )
        .with_variable(
            dash.QueryVariable("instance")
            .label("Instance")
            .datasource(DATASOURCE)
            .query('label_values(eagle3_ready{job=~"$job"}, instance)')
            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
            .sort(VariableSort.ALPHABETICAL_ASC)
            .multi(True)
            .include_all(True)
            .all_value(".*")
        )
    )
    panel_id = 0
    for title, panels in ROWS:
        panel_id += 1
        board.with_row(dash.Row(title).id(panel_id))
        for panel in panels:
            panel_id += 1
            board.with_panel(_panel(panel, panel_id))
    return board


def render() -> str:
    """The dashboard as the JSON Grafana imports (stable key order, so the committed file diffs well)."""
    data = json.loads(JSONEncoder(sort_keys=True, indent=2).encode(build().build()))
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def main() -> None:
    sys.stdout.write(render())


if __name__ == "__main__":
    main()
