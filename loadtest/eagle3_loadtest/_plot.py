"""The capacity search as a picture: answers/s and p50 / p99 latency against trainer ranks.

Written beside Locust's CSV (``<--csv prefix>_capacity.png``) at the end of a capacity run, so
the knee is seen rather than read off a table: the vertical line marks the capacity the search
reports (the last step within the limits), the dotted one the p95 limit it judged against.
matplotlib draws off-screen (the Agg backend); nothing here needs a display.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["capacity_figure", "plot_path", "save_capacity_plot"]


def plot_path(csv_prefix: str | None, report_file: str | None) -> Path | None:
    """Where the picture goes: beside the CSV files, else beside the JSON report, else nowhere."""
    if csv_prefix:
        return Path(f"{csv_prefix}_capacity.png")
    if report_file:
        path = Path(report_file)
        return path.with_name(f"{path.stem}_capacity.png")
    return None


def capacity_figure(summary: Mapping[str, Any], title: str = "") -> Any:
    """A matplotlib Figure of a capacity summary (:meth:`StepSearch.summary`): two panels sharing x."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    steps = summary["steps"]
    users = [s["users"] for s in steps]
    fig = Figure(figsize=(7.5, 6), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True)
    top.plot(users, [s.get("answers_per_second") or 0.0 for s in steps], "o-", color="tab:blue", label="answers/s")
    top.set_ylabel("/generate answers/s")
    top.set_ylim(bottom=0)
    for name, style in (("p50_ms", "o-"), ("p99_ms", "s-")):
        points = [(u, s[name]) for u, s in zip(users, steps, strict=True) if s.get(name) is not None]
        bottom.plot([u for u, _ in points], [v for _, v in points], style, label=name.removesuffix("_ms"))
    bottom.set_ylabel("latency (ms)")
    bottom.set_ylim(bottom=0)
    bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
    bottom.set_xlabel("trainer ranks (Locust users)")
    limit = summary.get("plan", {}).get("p95_limit_ms") or 0
    if limit:
        bottom.axhline(limit, color="grey", linestyle=":", label=f"p95 limit {limit:g} ms")
        bottom.set_ylim(0, max(bottom.get_ylim()[1], 1.1 * limit))
    knee = summary.get("capacity_users") or 0
    for ax in (top, bottom):
        if knee:
            ax.axvline(knee, color="tab:red", linestyle="--", label=f"capacity: {knee} ranks" if ax is top else None)
        for s in steps:
            if not s["passed"]:
                ax.axvspan(s["users"] - 0.5, s["users"] + 0.5, color="tab:red", alpha=0.1)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="upper left", fontsize="small")
    stopped = summary.get("stopped_because", "")
    top.set_title(f"{title}\ncapacity {knee} ranks: {stopped}" if title else f"capacity {knee} ranks: {stopped}")
    return fig


def save_capacity_plot(summary: Mapping[str, Any], path: Path, title: str = "") -> Path:
    """Draw :func:`capacity_figure` and write it as a PNG; returns the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    capacity_figure(summary, title).savefig(path, dpi=110)
    return path
