"""Check the dashboard and the alert rules against a real Prometheus that scrapes a real appliance.

Two commands, run by ``.ci/prometheus.sh`` between the steps that provoke each condition::

    python -m monitoring.check data --prometheus http://127.0.0.1:9090
    python -m monitoring.check alerts --prometheus http://127.0.0.1:9090 Eagle3ServerDown ...

``data`` waits (bounded) until every panel query returns at least one series through
Prometheus' HTTP API, with Grafana's variables set to "every server"; every alert expression
must be valid PromQL and each metric it names must have series in Prometheus (an alert on
a metric nobody exports would never fire). ``alerts`` waits until each named alert is pending
or firing (a ``for:`` of minutes is longer than CI waits; pending shows the condition holds).
Exit 1 with what failed.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import httpx

from monitoring.expressions import Expression, alert_expressions, dashboard_expressions, for_api, metric_names

__all__ = ["main"]


class Prometheus:
    """The few calls of Prometheus' HTTP API the checks need."""

    def __init__(self, url: str) -> None:
        self.client = httpx.Client(base_url=url, timeout=10, trust_env=False)

    def query(self, expr: str) -> list[dict[str, Any]]:
        resp = self.client.get("/api/v1/query", params={"query": expr})
        body = resp.json()
        if resp.status_code != 200 or body.get("status") != "success":
            raise ValueError(f"{body.get('errorType')}: {body.get('error')}")
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def alerts(self) -> dict[str, str]:
        """Active alerts: name → state (pending or firing)."""
        body = self.client.get("/api/v1/alerts").json()
        return {a["labels"]["alertname"]: a["state"] for a in body["data"]["alerts"]}


def _problems(prom: Prometheus, panels: list[Expression], alerts: list[Expression], window: str) -> list[str]:
    problems = []
    for e in panels:
        try:
            if not prom.query(for_api(e.expr, window)):
                problems.append(f"{e.source}: no data for {e.expr}")
        except ValueError as exc:
            problems.append(f"{e.source}: {exc} in {e.expr}")
    for e in alerts:
        try:
            prom.query(e.expr)
            for name in sorted(metric_names(e.expr)):
                if not prom.query(f'group({{__name__="{name}"}})'):
                    problems.append(f"{e.source}: no series of {name}")
        except ValueError as exc:
            problems.append(f"{e.source}: {exc} in {e.expr}")
    return problems


def check_data(prom: Prometheus, window: str, timeout: float) -> int:
    panels, alerts = dashboard_expressions(), alert_expressions()
    deadline = time.monotonic() + timeout
    while True:
        problems = _problems(prom, panels, alerts, window)
        if not problems or time.monotonic() > deadline:
            break
        time.sleep(1)
    for line in problems:
        print(f"FAIL {line}")
    print(
        f"{len(panels) - sum(p.startswith('panel') for p in problems)}/{len(panels)} panel queries return data; "
        f"{len(alerts) - sum(p.startswith('alert') for p in problems)}/{len(alerts)} alert expressions "
        "are valid and all their metrics have series"
    )
    return 1 if problems else 0


def check_alerts(prom: Prometheus, names: list[str], timeout: float) -> int:
    known = {e.source.removeprefix("alert ") for e in alert_expressions()}
    unknown = sorted(set(names) - known)
    if unknown:
        print(f"FAIL not in the rule file: {', '.join(unknown)}")
        return 1
    deadline = time.monotonic() + timeout
    while True:
        active = prom.alerts()
        missing = [n for n in names if n not in active]
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(1)
    for name in names:
        print(f"{'ok  ' if name in active else 'FAIL'} {name}: {active.get(name, 'inactive')}")
    return 1 if missing else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m monitoring.check", description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=["data", "alerts"])
    parser.add_argument("alerts", nargs="*", help="alert names that must be pending or firing (alerts)")
    parser.add_argument("--prometheus", default="http://127.0.0.1:9090")
    parser.add_argument("--window", default="1m", help="what $__rate_interval stands for")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the condition")
    args = parser.parse_intermixed_args(argv)
    prom = Prometheus(args.prometheus)
    if args.what == "data":
        return check_data(prom, args.window, args.timeout)
    return check_alerts(prom, args.alerts, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
