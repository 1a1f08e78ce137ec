"""The servers one trainer process uses: routing, failover, readiness probes and an elastic list.

Every server of a fleet serves the same model (checked on every session a server registers,
against the fingerprint the client pinned first: :mod:`eagle3_client.remote.pin`), so
any of them gives a request the same bits. That is what makes failover exact, and the client
uses it three ways:

* **Routing.** A request goes to the ready server expected to finish it first: ``(requests in
  flight + 1) x its recent time per request`` (at least the age of its oldest unanswered
  request), with at most ``max_in_flight`` requests per server. With equal servers that is
  "fewest in flight, then lowest latency". A server much
  slower than a busy fast one is skipped (the request waits for the fast one's slot) unless
  it would still finish within twice the fast one's time; an idle server's estimate halves
  every :data:`IDLE_HALF_LIFE_S` seconds, so a server that was slow once is tried again.
  The first answer of each session is not measured (warm-up).
* **Failover.** A request whose server fails (connection refused or reset, 5xx, not ready; a
  broken group transfer that could not be recovered over the wire; a timeout after which the
  server does not answer its readiness probe either) is sent to another ready server; the
  trainer gets one answer per request, never two. A request that timed out on a server that
  still answers ready is raised (``TargetTimeout``), the server kept: it was slow, not dead,
  and its control plane has already sent it again ``max_retries`` times under one request id
  (joined to the computation the server has); another server would compute it again. The
  failed server leaves the rotation and is probed in the background (``/health/ready``,
  ``/health`` on an upstream server) after ``probe_interval`` seconds, then at doubling
  intervals up to ``probe_max_interval``. Once it answers ready it gets a new session, the vocab mapping is
  replayed, its fingerprint is checked again, and it is back in the rotation. With no
  ready server a request waits up to ``failover_timeout`` seconds, then raises
  :class:`~eagle3_client.errors.NoServerReady`, which names every server and why it is out.
  A request that keeps failing (two 500s, or failovers for longer than ``failover_timeout``)
  is raised: then it is the request, not a server. A server whose heartbeat gets no answer is
  *suspect* (:meth:`Fleet.suspect`): with another server ready it leaves the rotation at once
  and its requests in flight are abandoned there and sent to a ready server, instead of
  waiting out their deadline on a frozen process.
* **Elastic list.** With a server-list file, the fleet re-reads it when it changes (a change
  counts once the file has stayed the same for one poll, so a half-written file is never
  used): new URLs join (after the same fingerprint check), removed ones are drained (no new
  requests; closed once their requests are done).

States of a member: ``joining`` (added by the list, not yet connected), ``ready``, ``out``
(failed; probed), ``draining`` (removed from the list). One background thread probes, joins
and drains; it is started on first use and stopped by :meth:`Fleet.close`.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from eagle3_client.errors import (
    ModelMismatch,
    NoServerReady,
    TargetHTTPError,
    TargetTimeLimit,
    TargetTimeout,
    TargetUnreachable,
    first_line,
)
from eagle3_client.transports.transfer import TransferError

__all__ = [
    "DRAINING",
    "IDLE_HALF_LIFE_S",
    "JOINING",
    "OUT",
    "READY",
    "Fleet",
    "FleetServer",
    "Member",
    "ServerList",
    "is_server_failure",
    "parse_server_list",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

JOINING, READY, OUT, DRAINING = "joining", "ready", "out", "draining"
IDLE_HALF_LIFE_S = 5.0
_TICK_S = 0.5  # how often waiting requests and the monitor look again without being woken
_LIST_POLL_S = 1.0
_PROBE_TIMEOUT_S = 5.0
_SLOWER_OK = 2.0  # a free server is used if it finishes within this factor of the best one
_EWMA = 0.3


class FleetServer(Protocol):
    """What the fleet needs from one server (``eagle3_client.remote.session.ServerSession``)."""

    @property
    def url(self) -> str: ...

    @property
    def fingerprint(self) -> str | None: ...

    def join(self, *, rejoin: bool, timeout: float | None = None) -> None:
        """Register a new session (replaying the vocab mapping); raise on failure, and
        :class:`ModelMismatch` when the server serves another model than the client pinned."""

    def leave(self) -> None:
        """Stop using the server: its session and data plane are released (best effort)."""

    def abort(self, reason: str) -> None:
        """Abandon the requests in flight on the server now: each raises a server failure."""

    def probe(self, timeout: float) -> str | None:
        """None when the server answers ready, else why not."""

    def close(self) -> None: ...


S = TypeVar("S", bound=FleetServer)


_REASON_CHARS = 300  # a server's reason (stats, NoServerReady) stays one short line


def is_server_failure(exc: BaseException) -> bool:
    """Whether ``exc`` says the server (not the request) failed, so another server should get it."""
    if isinstance(exc, TargetTimeLimit):
        return False  # alive and computing it; another server (or a new session) would compute it again
    if isinstance(exc, TargetHTTPError):
        return exc.status >= 500
    return isinstance(exc, (TargetUnreachable, TransferError))


def parse_server_list(text: str) -> list[str]:
    """URLs of a server-list file: one per line; blank lines and ``#`` comments skipped; duplicates once."""
    urls: list[str] = []
    for line in text.splitlines():
        url = line.split("#", 1)[0].strip().rstrip("/")
        if url and url not in urls:
            urls.append(url)
    return urls


class ServerList:
    """A file of server URLs, re-read when it changes (a change is applied once it is stable for one poll)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._seen = self._stat()  # before reading: a change made meanwhile is seen by the next poll
        try:
            text = self.path.read_text()
        except OSError as exc:
            raise ValueError(f"cannot read the server list {self.path}: {exc.strerror}") from None
        self.urls = parse_server_list(text)
        if not self.urls:
            raise ValueError(f"the server list {self.path} names no server (one URL per line)")
        self._pending: list[str] | None = None

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def poll(self) -> list[str] | None:
        """The new list once a change has settled; None when nothing (or nothing stable yet) changed."""
        stat = self._stat()
        if stat is None:
            return None  # gone for the moment (being replaced): keep the current list
        if stat != self._seen:
            self._seen = stat
            try:
                self._pending = parse_server_list(self.path.read_text())
            except OSError:
                self._pending = None
            return None
        pending, self._pending = self._pending, None
        if pending is None or pending == self.urls:
            return None
        self.urls = pending
        return pending


@dataclass(eq=False)
class Member(Generic[S]):
    """One server in the fleet, with what routing and the probes know about it."""

    server: S
    state: str = JOINING
    reason: str = ""  # why it is out (its last failure)
    probe_result: str = ""  # what the last readiness probe said
    in_flight: int = 0
    peak_in_flight: int = 0
    served: int = 0
    failovers: int = 0  # requests that failed here and went to another server
    readmissions: int = 0
    service_s: float | None = None  # recent time per request (EWMA), None until measured
    samples: int = 0
    last_done: float = field(default_factory=time.monotonic)
    last_dispatch: float = 0.0
    dispatched_at: list[float] = field(default_factory=list)  # of the requests in flight
    out_since: float = 0.0
    probe_at: float = 0.0
    probe_delay: float = 0.0

    @property
    def url(self) -> str:
        return self.server.url


class Fleet(Generic[S]):
    """Routing, failover, probing and the elastic list for the servers of one client (module docstring).

    **Parameters:**

    * ``servers`` - the initial servers (not yet connected: :meth:`start` connects them).
    * ``make_server`` - builds a server for a URL the list adds.
    * ``max_in_flight`` - requests per server at once.
    * ``failover_timeout`` - seconds a request waits with no ready server.
    * ``probe_interval``, ``probe_max_interval`` - the probe back-off.
    * ``server_list`` - the file to follow, if any.
    """

    def __init__(
        self,
        servers: Sequence[S],
        *,
        make_server: Callable[[str], S],
        max_in_flight: int = 2,
        failover_timeout: float = 600.0,
        probe_interval: float = 1.0,
        probe_max_interval: float = 10.0,
        server_list: ServerList | None = None,
    ) -> None:
        self._members = [Member(s) for s in servers]
        self._draining: list[Member[S]] = []
        self._make_server = make_server
        self.max_in_flight = max_in_flight
        self.failover_timeout = failover_timeout
        self.probe_interval = probe_interval
        self.probe_max_interval = probe_max_interval
        self.server_list = server_list
        self._cond = threading.Condition()
        self._start_lock = threading.Lock()
        self._started = False
        self._closing = False
        self._wake = threading.Event()
        self._monitor: threading.Thread | None = None

    # -- membership -------------------------------------------------------------------

    @property
    def members(self) -> list[Member[S]]:
        """The servers in the list (draining ones excluded), in list order."""
        with self._cond:
            return list(self._members)

    @property
    def size(self) -> int:
        with self._cond:
            return len(self._members)

    def start(self) -> None:
        """Connect every server and check that they serve one model; once, on first use.

        Servers that fail to connect leave the rotation and are probed. If none connects, or
        one refuses for a reason that is not a server failure (auth, protocol), this raises
        and the next call tries again; :class:`ModelMismatch` if the fingerprints differ.
        """
        if self._started:
            return
        with self._start_lock:
            if self._started:
                return
            members = self.members
            errors = self._join_all(members)
            for exc in errors.values():
                if not is_server_failure(exc):
                    raise exc
            if len(errors) == len(members):
                if len(members) == 1:
                    raise next(iter(errors.values()))
                raise NoServerReady(
                    "no target server could be reached",
                    {m.url: first_line(exc, _REASON_CHARS) for m, exc in errors.items()},
                ) from next(iter(errors.values()))
            self._check_one_model([m for m in members if m not in errors])
            now = time.monotonic()
            with self._cond:
                for m in members:
                    if m in errors:
                        self._set_out(m, first_line(errors[m], _REASON_CHARS), now)
                    else:
                        m.state = READY
            for m in errors:
                logger.warning("%s: not reachable at start (%s); probing it", m.url, m.reason)
                m.server.leave()
            self._started = True
            self._monitor = threading.Thread(target=self._run_monitor, name="eagle3-fleet", daemon=True)
            self._monitor.start()

    def _join_all(self, members: list[Member[S]]) -> dict[Member[S], BaseException]:
        def join(m: Member[S]) -> BaseException | None:
            try:
                m.server.join(rejoin=False)
            except Exception as exc:  # noqa: BLE001 - sorted out by the caller
                return exc
            return None

        if len(members) == 1:
            results = [join(members[0])]
        else:
            with concurrent.futures.ThreadPoolExecutor(min(16, len(members)), "eagle3-connect") as pool:
                results = list(pool.map(join, members))
        return {m: exc for m, exc in zip(members, results, strict=True) if exc is not None}

    def _check_one_model(self, members: list[Member[S]]) -> None:
        """Warn about servers whose model cannot be checked (the sessions check the others: ``join``)."""
        seen = [m.url for m in members if m.server.fingerprint]
        unchecked = [m.url for m in members if not m.server.fingerprint]
        if seen and unchecked:
            logger.warning("cannot check that %s serve the fleet's model: they report no fingerprint", unchecked)

    # -- requests ---------------------------------------------------------------------

    def run(self, fn: Callable[[S, int], T], *, measure: bool = False) -> T:
        """``fn(server, attempt)`` on the best ready server, failing over as the module docstring says.

        ``measure``: the call is a ``/generate`` whose duration feeds the routing estimate.
        """
        self.start()
        attempt = 0
        failing_since: float | None = None
        errors_500 = 0
        while True:
            member, begun = self._acquire(failing_since)
            attempt += 1
            try:
                result = fn(member.server, attempt)
            except BaseException as exc:
                self._release(member, begun, ok=False, measure=False)
                if isinstance(exc, ModelMismatch):  # restarted with another model (its new session said so)
                    if self.size <= 1:
                        raise  # nowhere else to go; each request checks it again (it may come back right)
                    logger.error("%s; it stays out of the rotation", first_line(exc, _REASON_CHARS))
                    self.fail(member, exc)
                    failing_since = failing_since if failing_since is not None else time.monotonic()
                    continue
                if not is_server_failure(exc):
                    raise
                if isinstance(exc, TargetHTTPError) and exc.status == 500:
                    errors_500 += 1
                    if errors_500 >= 2:
                        raise  # two servers failed on it: the request, not a server
                if isinstance(exc, TargetTimeout) and self._answers_ready(member):
                    raise  # a slow request, retried on its server already: sent elsewhere it would be computed again
                self.fail(member, exc)
                failing_since = failing_since if failing_since is not None else time.monotonic()
                continue
            self._release(member, begun, ok=True, measure=measure)
            return result

    def _acquire(self, failing_since: float | None) -> tuple[Member[S], float]:
        none_since: float | None = None
        with self._cond:
            while True:
                if self._closing:
                    raise RuntimeError("the client is closed")
                now = time.monotonic()
                if failing_since is not None and now - failing_since > self.failover_timeout:
                    raise self._no_server(f"a request kept failing over for {self.failover_timeout:g} s")
                ready = [m for m in self._members if m.state == READY]
                if ready:
                    none_since = None
                    choice = self._choose(ready, now)
                    if choice is not None:
                        choice.in_flight += 1
                        choice.peak_in_flight = max(choice.peak_in_flight, choice.in_flight)
                        choice.last_dispatch = now
                        choice.dispatched_at.append(now)
                        return choice, now
                    self._cond.wait(_TICK_S)
                    continue
                none_since = now if none_since is None else none_since
                remaining = none_since + self.failover_timeout - now
                if remaining <= 0:
                    raise self._no_server(f"no target server was ready for {self.failover_timeout:g} s")
                self._cond.wait(min(remaining, _TICK_S))

    def _choose(self, ready: list[Member[S]], now: float) -> Member[S] | None:
        known = [m.service_s for m in ready if m.service_s is not None]
        default = min(known) if known else 0.0

        def finish(m: Member[S]) -> float:
            service = default if m.service_s is None else m.service_s
            if m.in_flight == 0:  # idle: let a once-slow server be tried again, eventually
                service *= 0.5 ** ((now - m.last_done) / IDLE_HALF_LIFE_S)
            elif m.dispatched_at:  # a request it has not answered yet says it is at least that slow
                service = max(service, now - min(m.dispatched_at))
            return (m.in_flight + 1) * service

        def key(m: Member[S]) -> tuple[float, int, float]:
            return (finish(m), m.in_flight, m.last_dispatch)

        free = [m for m in ready if m.in_flight < self.max_in_flight]
        if not free:
            return None
        best_free = min(free, key=key)
        best = min(ready, key=key)
        if best is best_free or finish(best_free) <= _SLOWER_OK * finish(best):
            return best_free
        return None  # a much faster server frees a slot sooner: wait for it

    def _release(self, member: Member[S], begun: float, *, ok: bool, measure: bool) -> None:
        with self._cond:
            member.in_flight -= 1
            if begun in member.dispatched_at:
                member.dispatched_at.remove(begun)
            now = time.monotonic()
            if ok:
                member.served += 1
                if measure:
                    member.samples += 1
                    if member.samples > 1:  # the first answer of a session warms up; not a sample
                        sample = now - max(begun, member.last_done)
                        old = member.service_s
                        member.service_s = sample if old is None else (1 - _EWMA) * old + _EWMA * sample
                    member.last_done = now
            self._cond.notify_all()
        if member.state == DRAINING and member.in_flight == 0:
            self._wake.set()

    def _answers_ready(self, member: Member[S]) -> bool:
        """Whether ``member``, whose request just timed out, still answers its readiness probe (alive)."""
        why = member.server.probe(min(_PROBE_TIMEOUT_S, max(self.probe_max_interval, 1.0)))
        if why is not None:
            return False
        logger.warning("%s: a request timed out but the server answers ready: raised, the server stays", member.url)
        return True

    def suspect(self, server: S, reason: str) -> None:
        """``server`` stopped answering (a heartbeat got no answer): when another server is ready,
        it leaves the rotation now and its requests in flight are abandoned, so that they move
        to a ready server at once instead of waiting out their deadline there. Alone, it is kept:
        its requests have nowhere to go and wait for it (at most ``generate_wait()`` each)."""
        with self._cond:
            member = next((m for m in self._members if m.server is server), None)
            if member is None or member.state != READY:
                return
            if not any(m.state == READY for m in self._members if m is not member):
                return
        logger.warning("%s is suspect (%s): its requests move to the ready servers", member.url, reason)
        self.fail(member, TargetUnreachable(f"{member.url}: {reason}"), count=False)
        server.abort(reason)

    def fail(self, member: Member[S], exc: BaseException, *, count: bool = True) -> None:
        """Take ``member`` out of the rotation after ``exc`` (once; later failures only count).

        ``count``: a request failed there (it counts in ``failovers``)."""
        reason = first_line(exc, _REASON_CHARS)
        with self._cond:
            if count:
                member.failovers += 1
            if member.state != READY:
                return
            self._set_out(member, reason, time.monotonic())
            others = sum(1 for m in self._members if m.state == READY)
        logger.warning(
            "%s failed a request (%s): out of the rotation, requests go to the %d other ready server(s); "
            "probing it every %g-%g s",
            member.url,
            reason,
            others,
            self.probe_interval,
            self.probe_max_interval,
        )
        member.server.leave()
        self._wake.set()

    def _set_out(self, member: Member[S], reason: str, now: float) -> None:
        member.state = OUT
        member.reason = reason
        member.probe_result = ""
        member.out_since = now
        member.probe_delay = self.probe_interval
        member.probe_at = now + self.probe_interval
        member.samples = 0
        self._cond.notify_all()

    def _no_server(self, why: str) -> NoServerReady:
        now = time.monotonic()
        reasons = {}
        with self._cond:
            for m in self._members:
                if m.state == OUT:
                    probe = f"; last probe: {m.probe_result}" if m.probe_result else ""
                    reasons[m.url] = f"out for {now - m.out_since:.0f} s: {m.reason}{probe}"
                elif m.state == READY:
                    reasons[m.url] = f"ready but busy ({m.in_flight} in flight)"
                else:
                    reasons[m.url] = m.state
        return NoServerReady(f"{why} (failover_timeout); the servers:", reasons)

    # -- the background thread ----------------------------------------------------------

    def _run_monitor(self) -> None:
        next_list_poll = 0.0
        while not self._closing:
            now = time.monotonic()
            for m in self.members:
                if self._closing:
                    return
                if m.state == OUT and m.probe_at <= now:
                    self._probe(m)
                elif m.state == JOINING:
                    self._join_new(m)
            self._retire_drained()
            if self.server_list is not None and now >= next_list_poll:
                next_list_poll = now + _LIST_POLL_S
                self._follow_list()
            with self._cond:
                waits = [m.probe_at - time.monotonic() for m in self._members if m.state == OUT]
            timeout = min([_TICK_S * 2, *waits])
            self._wake.wait(max(timeout, 0.01))
            self._wake.clear()

    def _probe(self, member: Member[S]) -> None:
        why = member.server.probe(min(_PROBE_TIMEOUT_S, max(self.probe_max_interval, 1.0)))
        if why is None:
            why = self._admit(member, rejoin=True)
            if why is None:
                return
        with self._cond:
            member.probe_result = why
            member.probe_delay = min(member.probe_delay * 2, self.probe_max_interval)
            member.probe_at = time.monotonic() + member.probe_delay
        logger.debug("%s: still out (%s); next probe in %.1f s", member.url, why, member.probe_delay)

    def _admit(self, member: Member[S], *, rejoin: bool) -> str | None:
        """Register ``member`` again and put it back in the rotation; why not, or None when done."""
        try:
            member.server.join(rejoin=rejoin, timeout=_PROBE_TIMEOUT_S)
        except ModelMismatch as exc:  # the session's check (eagle3_client.remote.pin)
            member.server.leave()
            reason = first_line(exc, _REASON_CHARS)
            logger.error("%s; it stays out of the rotation", reason)
            return reason
        except Exception as exc:  # noqa: BLE001 - any failure keeps it out
            member.server.leave()
            return f"ready, but registering failed: {first_line(exc, _REASON_CHARS)}"
        with self._cond:
            was_out = member.state == OUT
            away = time.monotonic() - member.out_since
            member.state = READY
            member.reason = member.probe_result = ""
            member.service_s = None  # a new process, perhaps: measured afresh (counts as fast meanwhile)
            if was_out:
                member.readmissions += 1
            self._cond.notify_all()
        if was_out:
            logger.info("%s is ready again after %.1f s out: back in the rotation (new session)", member.url, away)
        else:
            logger.info("%s joined the fleet", member.url)
        return None

    def _join_new(self, member: Member[S]) -> None:
        why = self._admit(member, rejoin=False)
        if why is not None:
            with self._cond:
                self._set_out(member, why, time.monotonic())
            logger.warning("%s could not join (%s); probing it", member.url, why)

    def _follow_list(self) -> None:
        assert self.server_list is not None
        try:
            urls = self.server_list.poll()
        except Exception as exc:  # noqa: BLE001 - a bad read keeps the current list
            logger.warning("cannot re-read the server list %s: %s", self.server_list.path, exc)
            return
        if urls is None:
            return
        with self._cond:
            current = {m.url: m for m in self._members}
            removed = [m for url, m in current.items() if url not in urls]
            added = [url for url in urls if url not in current]
        new = [Member(self._make_server(url)) for url in added]
        with self._cond:
            for m in removed:
                m.state = DRAINING
                self._members.remove(m)
                self._draining.append(m)
            self._members.extend(new)
            self._cond.notify_all()
        if added or removed:
            logger.info(
                "server list %s changed: %d joining %s, %d draining %s",
                self.server_list.path,
                len(added),
                added,
                len(removed),
                [m.url for m in removed],
            )
        self._wake.set()

    def _retire_drained(self) -> None:
        with self._cond:
            done = [m for m in self._draining if m.in_flight == 0]
            for m in done:
                self._draining.remove(m)
        for m in done:
            logger.info("%s drained and closed", m.url)
            m.server.close()

    # -- reporting and closing ---------------------------------------------------------

    def describe(self, member: Member[S]) -> dict[str, Any]:
        """What ``transport_stats()`` shows about a member's place in the fleet."""
        with self._cond:
            return {
                "state": member.state,
                "reason": member.reason or None,
                "last_probe": member.probe_result or None,
                "in_flight": member.in_flight,
                "peak_in_flight": member.peak_in_flight,
                "served": member.served,
                "failovers": member.failovers,
                "readmissions": member.readmissions,
                "seconds_per_request": member.service_s,
            }

    def begin_close(self) -> None:
        """Refuse new requests and wake every waiting one (it raises)."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._wake.set()

    def close(self) -> None:
        """Stop the background thread and close every server (after :meth:`begin_close`)."""
        self.begin_close()
        if self._monitor is not None and self._monitor is not threading.current_thread():
            self._monitor.join(timeout=_PROBE_TIMEOUT_S + 1)
        with self._cond:
            members = self._members + self._draining
        for m in members:
            m.server.close()
