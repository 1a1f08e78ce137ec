"""Pick the scenario when ``locust -f loadtest/`` has loaded all of them, and switch the capacity shape.

Every concrete user class names its ``scenario`` (``steady``, ``capacity``, ``faults``) and
tags its task with it. On the master (or the only process), at ``init``:

* ``--tags``/``--exclude-tags`` keep the classes of those scenarios (Locust alone would keep
  classes whose every task was filtered away, and they fail when spawned);
* user classes named on the command line are kept as given;
* with neither, and several scenarios loaded, only ``steady`` runs.

Locust uses the first ``LoadTestShape`` it finds for every run, so the capacity shape is
removed unless the capacity scenario is the one selected. Workers keep every class: the
master tells them which to spawn.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from typing import Any

import gevent
from locust import events
from locust.env import Environment
from locust.runners import WorkerRunner

from eagle3_loadtest._options import RunSettings

__all__ = ["DEFAULT_SCENARIO", "SELECTION", "Selection", "scenario_of"]

logger = logging.getLogger(__name__)

DEFAULT_SCENARIO = "steady"


@dataclass
class Selection:
    scenario: str = ""  # the one scenario running, or "mixed" when classes of several were named


SELECTION = Selection()


def scenario_of(user_class: type) -> str:
    return str(getattr(user_class, "scenario", "") or "")


@events.init.add_listener
def _select(environment: Environment, **_kw: Any) -> None:
    # The event loop's clock was last read before the locustfiles imported torch (seconds);
    # without a refresh, the --run-time timer Locust arms next would fire that much early.
    gevent.get_hub().loop.update_now()
    if isinstance(environment.runner, WorkerRunner) or environment.parsed_options is None:
        return
    opts = environment.parsed_options
    try:
        RunSettings.from_options(opts)  # bad options stop the run here, before any user starts
    except ValueError as exc:
        logger.error("invalid load-test options: %s", exc)
        sys.exit(2)
    classes = list(environment.user_classes)
    tags, exclude = set(opts.tags or ()), set(opts.exclude_tags or ())
    if tags or exclude:
        kept = [c for c in classes if scenario_of(c) not in exclude and (not tags or scenario_of(c) in tags)]
    elif not opts.user_classes and len({scenario_of(c) for c in classes}) > 1:
        kept = [c for c in classes if scenario_of(c) == DEFAULT_SCENARIO]
        logger.info(
            "several scenarios are loaded and none is selected: running %r (select one with --tags %s)",
            DEFAULT_SCENARIO,
            "|".join(sorted({scenario_of(c) for c in classes})),
        )
    else:
        kept = classes
    if opts.kill_restart == 0:  # the kill-and-restart fault runs only when asked for
        kept = [c for c in kept if not getattr(c, "needs_kill_restart", False)]
    if not kept:
        raise ValueError(f"no user class is left for --tags {sorted(tags)} / --exclude-tags {sorted(exclude)}")
    environment.user_classes[:] = kept
    scenarios = {scenario_of(c) for c in kept}
    SELECTION.scenario = scenarios.pop() if len(scenarios) == 1 else "mixed"
    if SELECTION.scenario != "capacity" and environment.shape_class is not None:
        logger.info("the capacity search shape is off: scenario %r runs with -u/-r/-t", SELECTION.scenario)
        environment.shape_class = None
    logger.info("scenario %s: users %s", SELECTION.scenario, ", ".join(c.__name__ for c in kept))
