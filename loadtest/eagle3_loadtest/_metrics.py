"""This process's :class:`SupervisionCounters`, and their trip from the workers to the master.

Workers attach their counts to each stats report (``report_to_master``) and restart from
zero; the master adds what arrives (``worker_report``). In a single-process run the users
count straight into the same object, so ``COUNTERS`` on the master (or the only process)
always holds the run's totals.
"""

from __future__ import annotations

from typing import Any

from locust import events
from locust.env import Environment

from eagle3_loadtest._counters import SupervisionCounters

__all__ = ["COUNTERS", "GENERATE", "REPORT_KEY", "STREAM", "generate_entry"]

GENERATE = "generate"  # the stats row of the well-behaved ranks' /generate calls
STREAM = "STREAM"  # its request type when the ranks are stream consumers (--stream-queue): each wait for a batch
COUNTERS = SupervisionCounters()
REPORT_KEY = "eagle3_supervision"


def generate_entry(stats: Any) -> Any:
    """The ranks' row in Locust's ``stats``: ``POST generate``, or ``STREAM generate`` (None before any)."""
    entry = stats.entries.get((GENERATE, "POST"))
    return entry if entry is not None else stats.entries.get((GENERATE, STREAM))


@events.test_start.add_listener
def _reset(environment: Environment, **_kw: Any) -> None:
    COUNTERS.reset()


@events.report_to_master.add_listener
def _send(client_id: str, data: dict[str, Any]) -> None:
    data[REPORT_KEY] = COUNTERS.take()


@events.worker_report.add_listener
def _receive(client_id: str, data: dict[str, Any]) -> None:
    COUNTERS.merge(data.get(REPORT_KEY, {}))
