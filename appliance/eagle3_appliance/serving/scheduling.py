"""Which waiting ``/generate`` runs next: the oldest, unless its client will have given up by the answer.

Why: first come, first served is fair, and right for clients that wait (ours do: they wait up
to the server's ``--request-timeout``). A client with a timeout shorter than the queue, though,
gives up while its request waits; its retry joins the back of the queue and gives up again, and
computing the oldest request then mostly produces answers that arrive after their client left.

So the server learns, per session, how long its clients have waited before giving up
(:class:`Patience`: the median of the last few ages at which a queued request's client
disconnected; upstream clients share the anonymous session), and :func:`pick` runs the oldest
request that can still be answered in time (its age plus the recent forward time, with
:data:`FORWARD_MARGIN`, within that patience). A session whose clients were never seen giving
up counts as patient, so its requests stay strictly in arrival order; when no request can make
it, the youngest runs (the oldest would surely be late; the youngest has the best chance).
Nothing is dropped here: a request passed over keeps its place until its client leaves (then
the pipeline drops it) or its turn comes.

:class:`Scheduler` holds the requests waiting for their turn and hands the model thread one
unit (a request, or a micro-batched group) at a time.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

__all__ = ["FORWARD_MARGIN", "PATIENCE_SAMPLES", "PATIENCE_TTL_S", "Patience", "Scheduler", "pick"]

# The recent forward time is stretched by this much when judging whether an answer can still
# arrive in time (forwards slow down when the machine is busy).
FORWARD_MARGIN = 1.25
# Departures remembered per session, and for how long (clients may change their timeout).
PATIENCE_SAMPLES = 8
PATIENCE_TTL_S = 600.0


class Patience:
    """How long clients of each session wait in the queue before they give up (None: never seen)."""

    def __init__(self) -> None:
        self._seen: dict[str, deque[tuple[float, float]]] = {}

    def gave_up(self, session: str, waited_s: float, now: float | None = None) -> None:
        now = time.perf_counter() if now is None else now
        self._seen.setdefault(session, deque(maxlen=PATIENCE_SAMPLES)).append((now, waited_s))

    def estimate(self, session: str | None, now: float | None = None) -> float | None:
        samples = self._seen.get(session) if session is not None else None
        if not samples:
            return None
        now = time.perf_counter() if now is None else now
        recent = [waited for when, waited in samples if now - when <= PATIENCE_TTL_S]
        return statistics.median(recent) if recent else None


@dataclass
class _Turn:
    sessions: tuple[str | None, ...]
    arrived: float  # perf_counter of the oldest request in the unit
    go: asyncio.Future[None] = field(repr=False)


def pick(
    waiting: Sequence[tuple[Sequence[str | None], float]],
    now: float,
    forward_s: float,
    patience: Callable[[str | None], float | None],
) -> int:
    """Index of the unit to run next among ``(sessions, arrived)`` in arrival order.

    The first (oldest) unit in which some request can be answered before its session's
    patience runs out; the youngest when none can.
    """
    for index, (sessions, arrived) in enumerate(waiting):
        for session in sessions:
            limit = patience(session)
            if limit is None or (now - arrived) + forward_s <= limit:
                return index
    return len(waiting) - 1


class Scheduler:
    """Gives the model thread one ``/generate`` unit at a time, chosen by :func:`pick`.

    ``forward_s`` is the recent time of one forward (the admission's estimate). Other model
    work (installing a vocab mapping, LM-head rows) goes straight to the model thread and
    never waits behind the whole ``/generate`` queue.
    """

    def __init__(self, forward_s: Callable[[], float]) -> None:
        self.patience = Patience()
        self._forward_s = forward_s
        self._waiting: list[_Turn] = []
        self._busy = False

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @asynccontextmanager
    async def turn(self, sessions: Sequence[str | None], arrived: float) -> AsyncIterator[None]:
        """Wait until this unit may use the model thread; hold the turn inside the block."""
        me = _Turn(tuple(sessions), arrived, asyncio.get_running_loop().create_future())
        self._waiting.append(me)
        self._dispatch()
        try:
            await me.go
        except BaseException:
            if me in self._waiting:
                self._waiting.remove(me)
            elif me.go.done() and not me.go.cancelled():
                self._release()  # the turn came as the caller was cancelled: pass it on
            raise
        try:
            yield
        finally:
            self._release()

    def _release(self) -> None:
        self._busy = False
        self._dispatch()

    def _dispatch(self) -> None:
        self._waiting = [t for t in self._waiting if not t.go.cancelled()]
        if self._busy or not self._waiting:
            return
        now = time.perf_counter()
        index = pick(
            [(t.sessions, t.arrived) for t in self._waiting],
            now,
            self._forward_s() * FORWARD_MARGIN,
            lambda session: self.patience.estimate(session, now),
        )
        turn = self._waiting.pop(index)
        self._busy = True
        turn.go.set_result(None)
