"""Every PromQL expression the dashboard and the alert rules hold, and the metrics each names.

Read from the committed files (what an operator imports), not from the generator, so a hand
edit to the JSON is checked too. Metric names are found without a PromQL parser: label
matchers, strings, grouping clauses, range and offset durations and Grafana variables are
removed; what is left that is not a function, a keyword or a number is a metric name.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "ALERTS",
    "DASHBOARD",
    "PROMETHEUS_METRICS",
    "Expression",
    "alert_expressions",
    "all_expressions",
    "dashboard_expressions",
    "exported_names",
    "for_api",
    "metric_names",
    "unexported",
]

ROOT = Path(__file__).resolve().parent
DASHBOARD = ROOT / "grafana" / "eagle3-appliance.json"
ALERTS = ROOT / "prometheus" / "alerts.yml"

# Series Prometheus makes itself, not the appliance.
PROMETHEUS_METRICS = frozenset({"up", "scrape_duration_seconds", "scrape_samples_scraped", "ALERTS"})

_KEYWORDS = frozenset(
    {
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "bool",
        "offset",
        "and",
        "or",
        "unless",
        "inf",
        "nan",
    }
)
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_RANGE = re.compile(r"\[[^\]]*\]")
_VARIABLE = re.compile(r"\$\{?\w+\}?")
_NAME = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


@dataclass(frozen=True)
class Expression:
    """One expression and where it comes from (``panel <title>`` or ``alert <name>``)."""

    source: str
    expr: str


def dashboard_expressions(path: Path = DASHBOARD) -> list[Expression]:
    """Every panel query of the dashboard JSON, rows' nested panels included."""
    board = json.loads(path.read_text())
    out: list[Expression] = []

    def visit(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            for target in panel.get("targets") or []:
                if target.get("expr"):
                    out.append(Expression(f"panel {panel.get('title')!r} {target.get('refId')}", target["expr"]))
            visit(panel.get("panels") or [])

    visit(board.get("panels") or [])
    return out


def alert_expressions(path: Path = ALERTS) -> list[Expression]:
    """Every alerting (and recording) rule's expression in a Prometheus rule file."""
    rules = yaml.safe_load(path.read_text())
    return [
        Expression(f"alert {rule.get('alert') or rule.get('record')}", str(rule["expr"]).strip())
        for group in rules["groups"]
        for rule in group["rules"]
    ]


def all_expressions() -> list[Expression]:
    return dashboard_expressions() + alert_expressions()


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects (``rate(x_total{a="b"}[5m])`` → ``{"x_total"}``)."""
    text = _STRING.sub('""', expr)
    text = _MATCHERS.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    text = _RANGE.sub(" ", text)
    text = _VARIABLE.sub(" ", text)
    names = set()
    for match in _NAME.finditer(text):
        name = match.group(0)
        rest = text[match.end() :].lstrip()
        if rest.startswith("(") or name.lower() in _KEYWORDS:
            continue  # a function or an aggregation, or a keyword
        if match.start() > 0 and (text[match.start() - 1].isdigit() or text[match.start() - 1] == "."):
            continue  # the exponent or suffix of a number, e.g. 1e3
        names.add(name)
    return names


def for_api(expr: str, rate_interval: str = "1m") -> str:
    """The expression as Prometheus' API takes it: Grafana's variables set to "every server"."""
    return (
        expr.replace("$__rate_interval", rate_interval).replace('=~"$job"', '=~".+"').replace('=~"$instance"', '=~".+"')
    )


def exported_names(exposition: str) -> set[str]:
    """The series names a ``/metrics`` text can hold: each sample's name, and each declared
    family's (a histogram's ``_bucket``/``_sum``/``_count``), so a GPU gauge that has no
    sample on a machine without NVML still counts as exported."""
    names: set[str] = set()
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            names.add(name)
            if kind.strip() in ("histogram", "summary"):
                names.update({f"{name}_bucket", f"{name}_sum", f"{name}_count"})
        elif line and not line.startswith("#"):
            sample = _NAME.match(line)
            if sample is not None:
                names.add(sample.group(0))
    return names


def unexported(expressions: list[Expression], exposition: str) -> dict[str, set[str]]:
    """For each expression that names a metric the server does not export: those names."""
    exported = exported_names(exposition) | PROMETHEUS_METRICS
    out: dict[str, set[str]] = {}
    for e in expressions:
        missing = metric_names(e.expr) - exported
        if missing:
            out[e.source] = missing
    return out
