"""Which requests are in flight, per session: what the drain waits for and the lease reaper spares.

A request is tracked from routing to the moment its response (streamed body included) is
finished. A client that vanishes mid-request cancels its handler without any response
event, so the connection's end closes whatever request it still had open; nothing leaks
into a drain that would then wait out its whole grace period.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

__all__ = ["InFlight", "Tracked"]


@dataclass
class Tracked:
    """One request being handled."""

    endpoint: str
    session_id: str | None
    work: bool  # counts for the drain (not a probe or a scrape)
    start: float = field(default_factory=time.perf_counter)
    done: bool = False


class InFlight:
    """Counts of open requests; used only from the event loop."""

    def __init__(self) -> None:
        self.work = 0
        self._by_session: Counter[str] = Counter()

    def begin(self, endpoint: str, session_id: str | None, *, work: bool) -> Tracked:
        tracked = Tracked(endpoint, session_id, work)
        if work:
            self.work += 1
        if session_id:
            self._by_session[session_id] += 1
        return tracked

    def end(self, tracked: Tracked) -> bool:
        """Close a request once; returns False if it was already closed."""
        if tracked.done:
            return False
        tracked.done = True
        if tracked.work:
            self.work -= 1
        if tracked.session_id:
            self._by_session[tracked.session_id] -= 1
            if self._by_session[tracked.session_id] <= 0:
                del self._by_session[tracked.session_id]
        return True

    def busy_sessions(self) -> set[str]:
        """Sessions with a request open right now (their lease must not run out under them)."""
        return set(self._by_session)
