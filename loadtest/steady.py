"""Steady training load: ``-u`` trainer ranks, each sending one ``/generate`` at a time.

Run it::

    locust -f loadtest/steady.py --headless -u 8 -r 8 -t 5m --host http://server:8001 --csv out/steady

Every answer is checked; the run exits 1 on any failed or wrong answer (or, with
``--max-p95-ms``, on a slow p95).
"""

from __future__ import annotations

from locust import tag, task

from eagle3_loadtest._rank import TrainingRank


class SteadyRank(TrainingRank):
    """A trainer rank under steady load."""

    scenario = "steady"

    @tag("steady")
    @task
    def generate(self) -> None:
        self.generate_once()
