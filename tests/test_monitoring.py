"""The dashboard and alert rules name only metrics a real server exports, and the JSON is current.

The full check (every expression returns data in a real Prometheus scraping a real server,
alerts fire when provoked) is ``.ci/prometheus.sh``; this one needs no Prometheus.
"""

from __future__ import annotations

import importlib.util
import json
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from eagle3_appliance.launch import ServerProcess
from monitoring import stream_load
from monitoring.expressions import (
    ALERTS,
    DASHBOARD,
    alert_expressions,
    dashboard_expressions,
    for_api,
    metric_names,
    unexported,
)
from tests.ops_support import metric, model_env, scrape
from tests.ops_support import server as start_server


@pytest.fixture(scope="module")
def exposition(server: ServerProcess) -> str:
    resp = httpx.get(server.url + "/metrics", trust_env=False, timeout=10)
    assert resp.status_code == 200
    return resp.text


def test_the_committed_dashboard_is_what_the_generator_builds() -> None:
    pytest.importorskip("grafana_foundation_sdk", reason="the generator's SDK needs Python 3.11+")
    from monitoring import dashboard

    assert DASHBOARD.read_text() == dashboard.render(), (
        "regenerate: python -m monitoring.dashboard > monitoring/grafana/eagle3-appliance.json"
    )


def test_every_panel_and_alert_names_only_exported_metrics(exposition: str) -> None:
    panels, alerts = dashboard_expressions(), alert_expressions()
    assert len(panels) >= 40 and len(alerts) >= 10
    assert unexported(panels + alerts, exposition) == {}


def test_a_panel_with_a_misspelt_metric_is_caught(exposition: str, tmp_path: Path) -> None:
    board = json.loads(DASHBOARD.read_text())
    target = board["panels"][1]["targets"][0]
    target["expr"] = target["expr"].replace("up{", "eagle3_redy{").replace("sum(", "sum(eagle3_ready + ")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(board))
    assert unexported(dashboard_expressions(bad), exposition) == {
        "panel 'Servers up / ready / draining' A": {"eagle3_redy"}
    }


def test_the_dashboard_covers_what_an_operator_asks() -> None:
    names = set().union(*(metric_names(e.expr) for e in dashboard_expressions()))
    for wanted in [
        "eagle3_request_success_total",  # answers/s
        "eagle3_inference_tokens_total",  # tokens/s
        "eagle3_inference_queue_duration_seconds_bucket",  # latency by phase
        "eagle3_inference_forward_duration_seconds_bucket",
        "eagle3_inference_pending_request_count",  # queue depth
        "eagle3_inflight_requests",
        "eagle3_request_failure_total",  # rejections
        "eagle3_connections_refused_total",
        "eagle3_response_bytes_total",  # bytes by data plane
        "eagle3_dataplane_fallbacks_total",
        "eagle3_connected_clients",  # sessions and leases
        "eagle3_session_ends_total",
        "DCGM_FI_DEV_GPU_UTIL",  # GPU health
        "DCGM_FI_DEV_FB_USED",
        "DCGM_FI_DEV_GPU_TEMP",
        "eagle3_gpu_xid_errors_total",
        "eagle3_ready",
        "eagle3_target_info",  # tensor-parallel mode
        "eagle3_stream_resident",  # the stream: resident answers against the watermarks
        "eagle3_stream_watermark_bytes",
        "eagle3_stream_paused",
        "eagle3_stream_refused_total",
        "eagle3_stream_produced_total",
        "eagle3_stream_claimed_total",
        "eagle3_stream_released_total",
        "eagle3_stream_queue_samples",  # the run queues hosted here
        "eagle3_stream_queue_events_total",
    ]:
        assert wanted in names, wanted


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ('sum by (instance) (rate(a_total{job=~"$job", x="{b}"}[$__rate_interval]))', {"a_total"}),
        ("histogram_quantile(0.99, sum by (le) (rate(h_bucket[5m])))", {"h_bucket"}),
        ("last_over_time(r[1h]) unless r", {"r"}),
        ("x == 0 unless on (job, instance) y == 1", {"x", "y"}),
        ("60 * sum(rate(c_total[1m] offset 5m)) > 1e3", {"c_total"}),
        ('max by (job) (g) / max by (job) (l{limit="max_queue"}) > 0.8', {"g", "l"}),
    ],
)
def test_metric_names_of_an_expression(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


def test_grafana_variables_become_plain_promql() -> None:
    expr = 'rate(a_total{job=~"$job", instance=~"$instance"}[$__rate_interval])'
    assert for_api(expr) == 'rate(a_total{job=~".+", instance=~".+"}[1m])'


def test_every_alert_has_a_severity_words_for_the_operator_a_unit_test_and_a_doc_row() -> None:
    rules = yaml.safe_load(ALERTS.read_text())["groups"][0]["rules"]
    tests = (ALERTS.parent / "alerts_test.yml").read_text()
    docs = (Path(__file__).resolve().parents[1] / "docs" / "monitoring.md").read_text()
    assert len(rules) >= 10
    for rule in rules:
        name = rule["alert"]
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name
        assert f"alertname: {name}\n" in tests, f"{name} has no promtool test"
        assert f"| `{name}` |" in docs, f"{name} is not in docs/monitoring.md"


def test_the_stream_row_follows_the_gpu_row_with_its_six_panels() -> None:
    board = json.loads(DASHBOARD.read_text())
    rows = [p["title"] for p in board["panels"] if p["type"] == "row"]
    assert rows[-2:] == ["Stream", "GPU"]
    start = next(i for i, p in enumerate(board["panels"]) if p["title"] == "Stream")
    panels = board["panels"][start + 1 : start + 7]
    assert [p["title"] for p in panels] == [
        "Resident answers / watermarks",
        "Resident samples",
        "Producers paused, refusals / s",
        "Produced / claimed / released / s",
        "Queue samples by state",
        "Queue events / s",
    ]
    assert panels[0]["fieldConfig"]["defaults"]["unit"] == "bytes"
    assert [t["legendFormat"] for t in panels[0]["targets"]] == [
        "{{instance}} resident",
        "{{instance}} high",
        "{{instance}} low",
    ]
    assert "watermark_bytes" in panels[0]["targets"][1]["expr"] and 'level="high"' in panels[0]["targets"][1]["expr"]


@pytest.fixture(scope="module")
def small_stream(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """An appliance whose resident answers stop at 1 MiB (a few of the driver's samples)."""
    log = tmp_path_factory.mktemp("stream") / "server.log"
    with start_server(["--cache-dir", str(cache_dir), "--stream-memory-mb", "1"], model_env(), log) as proc:
        yield proc.url


def test_the_stream_driver_moves_every_resident_answer_series(
    small_stream: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert stream_load.main(["--url", small_stream, "--without-queue"]) == 0
    out = capsys.readouterr().out
    line = re.search(r"stream_load: (\d+) samples kept, 2 claimed, 1 released, (\d+) more kept; 2 refused\n", out)
    assert line is not None, out
    first, again = int(line.group(1)), int(line.group(2))
    assert first >= 2 and again >= 1
    samples = scrape(small_stream)
    assert metric(samples, "eagle3_stream_produced_total") == first + again
    assert metric(samples, "eagle3_stream_refused_total") == 2
    assert metric(samples, "eagle3_stream_paused") == 1  # refused again after the release
    assert metric(samples, "eagle3_stream_claimed_total") == 2
    assert metric(samples, "eagle3_stream_released_total", reason="acked") == 1
    assert metric(samples, "eagle3_stream_released_total", reason="run_ended") == 0
    assert metric(samples, "eagle3_stream_resident", unit="samples") == first + again - 1
    assert metric(samples, "eagle3_stream_watermark_bytes", level="high") == 2**20
    runs = httpx.get(small_stream + "/stream/runs", trust_env=False).json()
    reserve = runs["reserve_bytes"]  # two of the largest answers: new samples leave it free
    assert 0 < reserve <= 2**19 and runs["low_watermark_bytes"] == min(0.75 * 2**20, 2**20 - reserve)
    assert metric(samples, "eagle3_stream_watermark_bytes", level="low") == runs["low_watermark_bytes"]
    assert 0 < metric(samples, "eagle3_stream_resident", unit="bytes") <= 2**20 - reserve
    assert "stream_load: queue step skipped (--without-queue)\n" in out


def test_the_stream_driver_says_when_the_appliance_queue_is_missing(capsys: pytest.CaptureFixture[str]) -> None:
    if importlib.util.find_spec(stream_load.QUEUE_MODULE) is not None:
        pytest.skip("the appliance-hosted queue is in this checkout")
    assert stream_load.main(["--url", "http://127.0.0.1:9"]) == 2
    assert "FAIL eagle3_client.streaming.appliance_queue is missing" in capsys.readouterr().out
