"""The step-load capacity search, as plain state that a Locust shape drives once a second.

Users go up in steps; each step is judged on the requests that completed between the end
of its settle time (users still connecting and registering) and its end. The search stops
at the first step whose p95 latency or error rate breaks the limits, or after the step at
``max_users``; the capacity is the user count of the last step that passed.

Kept free of Locust so that the decision logic can be tested with a fake clock.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["StepPlan", "StepResult", "StepSearch", "Window", "evaluate_step", "percentile"]


@dataclass(frozen=True)
class StepPlan:
    """Step sizes, timing and the limits a step must stay within (a limit of 0 ms means none)."""

    start_users: int
    step_users: int
    max_users: int
    step_duration_s: float
    settle_s: float
    p95_limit_ms: float
    max_error_rate: float

    def __post_init__(self) -> None:
        if self.start_users < 1 or self.step_users < 1:
            raise ValueError("capacity steps need at least 1 user to start and to add per step")
        if self.max_users < self.start_users:
            raise ValueError(f"max users {self.max_users} is below the first step's {self.start_users}")
        if not 0 <= self.settle_s < self.step_duration_s:
            raise ValueError(f"settle time {self.settle_s} s must be in [0, step duration {self.step_duration_s} s)")
        if self.p95_limit_ms < 0 or not 0 <= self.max_error_rate <= 1:
            raise ValueError("the p95 limit must be >= 0 and the error-rate limit in [0, 1]")

    @property
    def last_index(self) -> int:
        return (self.max_users - self.start_users) // self.step_users

    def users(self, index: int) -> int:
        return self.start_users + index * self.step_users


@dataclass(frozen=True)
class Window:
    """Cumulative ``/generate`` counts at one moment (Locust's stats plus our token counter)."""

    time_s: float
    requests: int
    failures: int
    response_times: Mapping[int, int]  # Locust's histogram: rounded milliseconds -> count
    tokens: int


@dataclass(frozen=True)
class StepResult:
    users: int
    requests: int
    failures: int
    error_rate: float | None
    p95_ms: float | None
    tokens_per_second: float | None
    passed: bool
    reason: str
    answers_per_second: float | None = None  # successful /generate per second
    p50_ms: float | None = None
    p99_ms: float | None = None


def percentile(histogram: Mapping[int, int], fraction: float) -> float | None:
    """The smallest recorded value with at least ``fraction`` of the samples at or below it."""
    total = sum(histogram.values())
    if total <= 0:
        return None
    rank = max(1, math.ceil(fraction * total))
    seen = 0
    for value in sorted(histogram):
        seen += histogram[value]
        if seen >= rank:
            return float(value)
    return float(max(histogram))


def evaluate_step(plan: StepPlan, users: int, start: Window, end: Window) -> StepResult:
    """Judge one step on what completed between two windows."""
    requests = end.requests - start.requests
    failures = end.failures - start.failures
    delta = {k: end.response_times.get(k, 0) - start.response_times.get(k, 0) for k in end.response_times}
    completed = {k: v for k, v in delta.items() if v > 0}
    p95 = percentile(completed, 0.95)
    elapsed = end.time_s - start.time_s
    tokens_per_second = (end.tokens - start.tokens) / elapsed if elapsed > 0 else None
    answers_per_second = (requests - failures) / elapsed if elapsed > 0 else None
    error_rate = failures / requests if requests else None
    reasons = []
    if not requests:
        reasons.append("no request completed during the step")
    elif error_rate is not None and error_rate > plan.max_error_rate:
        reasons.append(f"error rate {error_rate:.3f} > {plan.max_error_rate:g}")
    if plan.p95_limit_ms and p95 is not None and p95 > plan.p95_limit_ms:
        reasons.append(f"p95 {p95:.0f} ms > {plan.p95_limit_ms:g} ms")
    return StepResult(
        users=users,
        requests=requests,
        failures=failures,
        error_rate=error_rate,
        p95_ms=p95,
        tokens_per_second=tokens_per_second,
        passed=not reasons,
        reason="; ".join(reasons) or "within limits",
        answers_per_second=answers_per_second,
        p50_ms=percentile(completed, 0.5),
        p99_ms=percentile(completed, 0.99),
    )


@dataclass
class StepSearch:
    """Where the search is; :meth:`tick` returns the user count to run now, or None when done."""

    plan: StepPlan
    index: int = 0
    results: list[StepResult] = field(default_factory=list)
    done: bool = False
    stop_reason: str = ""
    _step_started: float | None = None
    _settled: Window | None = None

    def tick(self, now_s: float, sample: Callable[[], Window]) -> int | None:
        if self.done:
            return None
        if self._step_started is None:
            self._step_started = now_s
        in_step = now_s - self._step_started
        if self._settled is None and in_step >= self.plan.settle_s:
            self._settled = sample()
        if in_step >= self.plan.step_duration_s:
            end = sample()
            result = evaluate_step(self.plan, self.plan.users(self.index), self._settled or end, end)
            self.results.append(result)
            if not result.passed:
                self.stop(f"step at {result.users} users failed: {result.reason}")
                return None
            if self.index >= self.plan.last_index:
                self.stop(f"reached max users ({self.plan.max_users})")
                return None
            self.index += 1
            self._step_started, self._settled = now_s, None
        return self.plan.users(self.index)

    def stop(self, reason: str) -> None:
        if not self.done:
            self.done, self.stop_reason = True, reason

    @property
    def capacity_users(self) -> int:
        """Users of the last passing step before the first failure; 0 if none passed."""
        passed = 0
        for result in self.results:
            if not result.passed:
                break
            passed = result.users
        return passed

    def summary(self) -> dict[str, Any]:
        return {
            "capacity_users": self.capacity_users,
            "stopped_because": self.stop_reason or "the run ended before the search finished",
            "plan": asdict(self.plan),
            "steps": [asdict(r) for r in self.results],
        }
