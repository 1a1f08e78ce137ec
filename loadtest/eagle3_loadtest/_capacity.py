"""``StepCapacityShape``: Locust's side of the step-load capacity search (:mod:`._steps`).

It runs on the master (or the only process), where the stats of all workers meet. Each
tick it samples the cumulative ``/generate`` stats and token count, lets the search decide,
and spawns the scenario's user class only. In distributed mode workers report every 3 s,
so steps should last well over that (the default is 20 s). ``--run-time`` still bounds the
whole search.
"""

from __future__ import annotations

import logging
from typing import ClassVar

from locust import LoadTestShape, User

from eagle3_loadtest._metrics import COUNTERS, generate_entry
from eagle3_loadtest._options import RunSettings
from eagle3_loadtest._steps import StepSearch, Window

__all__ = ["StepCapacityShape"]

logger = logging.getLogger(__name__)


class StepCapacityShape(LoadTestShape):
    """Abstract: the capacity locustfile subclasses it and names the user class to spawn."""

    abstract = True
    # -u/-r are not used, but -t is (as an overall bound), so Locust need not warn about them.
    use_common_options = True
    rank_class: ClassVar[type[User]]

    def __init__(self) -> None:
        super().__init__()
        self.search: StepSearch | None = None

    def tick(self) -> tuple[int, float, list[type[User]]] | None:
        assert self.runner is not None
        options = self.runner.environment.parsed_options
        assert options is not None  # set once Locust has parsed its command line
        if self.search is None:
            self.search = StepSearch(RunSettings.from_options(options).capacity)
            logger.info("capacity search: %s", self.search.plan)
        now = self.get_run_time()
        run_time = getattr(options, "run_time", None)
        if run_time and now >= run_time:
            self.search.stop("--run-time ended the search")
            return None
        users = self.search.tick(now, self._window)
        if users is None:
            logger.info("capacity search done: %s", self.search.stop_reason)
            return None
        plan = self.search.plan
        return users, float(max(plan.start_users, plan.step_users)), [self.rank_class]

    def _window(self) -> Window:
        assert self.runner is not None
        entry = generate_entry(self.runner.stats)
        now = self.get_run_time()
        if entry is None:
            return Window(now, 0, 0, {}, COUNTERS.tokens)
        return Window(now, entry.num_requests, entry.num_failures, dict(entry.response_times), COUNTERS.tokens)
