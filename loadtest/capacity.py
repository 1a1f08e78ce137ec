"""Capacity search: add trainer ranks step by step until p95 latency or errors break the limits.

Run it::

    locust -f loadtest/capacity.py --headless --host http://server:8001 --csv out/capacity \
        --max-p95-ms 2000 --capacity-start-users 1 --capacity-step-users 2 --capacity-max-users 32

Each step lasts ``--capacity-step-time`` seconds; its first ``--capacity-settle-time`` seconds
are not judged. The highest passing user count is logged (``capacity: N users``) and written
to the report file. When the whole ``loadtest/`` folder is loaded, select this scenario
with ``--tags capacity`` (or the class name ``CapacityRank``); otherwise the shape stays off.
"""

from __future__ import annotations

from locust import tag, task

from eagle3_loadtest._capacity import StepCapacityShape
from eagle3_loadtest._rank import TrainingRank


class CapacityRank(TrainingRank):
    """A trainer rank spawned by the capacity search."""

    scenario = "capacity"

    @tag("capacity")
    @task
    def generate(self) -> None:
        self.generate_once()


class CapacitySearch(StepCapacityShape):
    rank_class = CapacityRank
