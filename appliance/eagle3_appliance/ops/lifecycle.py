"""The server's life after start: client leases, exit-when-idle, and the graceful drain.

* **Leases.** A reaper drops every registered session that has sent nothing (requests or
  heartbeats) for longer than ``--lease-seconds`` and has no request open; dropping closes
  the session's resources. A trainer killed with ``kill -9`` thus frees its data plane
  within about one lease. The anonymous (upstream) session never expires.
* **Exit when idle** (``--exit-when-idle``, for batch jobs): once at least one client has
  registered (or an upstream client has said ``/disconnect``) and no registered session is
  left, the server shuts down as on SIGTERM and exits 0. Off by default: a shared server
  stays up when one client leaves.
* **Drain.** On SIGTERM or SIGINT Sanic stops its loop; before it closes the listener this
  module marks the server not ready and draining (new work gets 503 with ``Retry-After``;
  probes, metrics, heartbeats and disconnects are still served), waits up to
  ``--grace-period`` seconds for in-flight requests and for group sends still delivering an
  answer (:attr:`Lifecycle.transfers`), closes every session's resources, and lets Sanic
  close the connections. The process exits 0; if the grace period ran out with work still
  running (a forward, or a send to a frozen peer) it exits 1 without waiting for it: neither
  can be interrupted. A second SIGTERM or SIGINT once the drain has begun ends the process at
  once with exit code 1.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Callable
from functools import partial

from sanic import Sanic

from eagle3_appliance.core.admission import Admission
from eagle3_appliance.core.sessions import Session, SessionRegistry
from eagle3_appliance.ops.inflight import InFlight
from eagle3_appliance.settings import Settings

__all__ = ["Lifecycle", "install_second_signal_exit"]

logger = logging.getLogger(__name__)


class Lifecycle:
    """Lease reaper, idle exit and drain for one app. Used from the event loop."""

    def __init__(
        self,
        app: Sanic,
        settings: Settings,
        sessions: SessionRegistry,
        inflight: InFlight,
        admission: Admission,
        *,
        on_session_end: Callable[[str], None] = lambda reason: None,
    ) -> None:
        self.app = app
        self.settings = settings
        self.sessions = sessions
        self.inflight = inflight
        self.admission = admission
        self.on_session_end = on_session_end
        # Work that outlives its request: group sends still delivering an answer (set by create_app).
        self.transfers: Callable[[], int] = lambda: 0
        self.draining = False
        self.forced = False  # the grace period ran out with work still in flight
        self.ever_registered = False
        self.upstream_left = False
        self._stopping = False
        self._closing: set[asyncio.Future[None]] = set()
        self._reaper: asyncio.Task[None] | None = None
        sessions.on_drop.append(self._session_dropped)

    # -- sessions ------------------------------------------------------------------

    def session_registered(self) -> None:
        self.ever_registered = True

    def upstream_disconnected(self) -> None:
        """An upstream client (no session) said goodbye: upstream's server would stop here."""
        self.upstream_left = True
        self._check_idle()

    def _session_dropped(self, session: Session, reason: str) -> None:
        logger.info("session %s (%s) ended: %s", session.id, session.client or "?", reason)
        self.on_session_end(reason)
        if session.extras:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                session.close()
            else:  # a data plane's close may block (process-group teardown): off the loop
                future = loop.run_in_executor(None, session.close)
                self._closing.add(future)
                future.add_done_callback(self._closing.discard)
        self._check_idle()

    def reap(self, now: float | None = None) -> list[Session]:
        """Drop sessions whose lease ran out; returns them."""
        return self.sessions.expire(self.settings.lease_seconds, busy=self.inflight.busy_sessions(), now=now)

    def start_reaper(self) -> None:
        """Run :meth:`reap_forever` on the running loop until the drain stops it."""
        self._reaper = asyncio.get_running_loop().create_task(self.reap_forever(), name="eagle3-lease-reaper")

    async def reap_forever(self) -> None:
        while True:
            shortest = min([s.lease_seconds or self.settings.lease_seconds for s in self.sessions.registered()]
                           + [self.settings.lease_seconds])  # fmt: skip
            await asyncio.sleep(max(0.05, min(shortest / 4, 5.0)))
            try:
                self.reap()
            except Exception:  # noqa: BLE001 - the reaper must outlive one bad close
                logger.exception("lease reaper failed")

    # -- exit when idle ----------------------------------------------------------------

    def _check_idle(self) -> None:
        if not self.settings.exit_when_idle or self._stopping or self.draining:
            return
        if not (self.ever_registered or self.upstream_left) or self.sessions.registered():
            return
        logger.info("the last client left and --exit-when-idle is set: shutting down")
        self._stopping = True
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        # Let the response that ended the last session go out first.
        loop.call_later(0.05, partial(self.app.stop, terminate=False))

    # -- drain ---------------------------------------------------------------------------

    def busy(self) -> bool:
        return self.inflight.work > 0 or not self.admission.idle() or self.transfers() > 0

    def _work_text(self) -> str:
        sends = self.transfers()
        return f"{self.inflight.work} request(s)" + (f" and {sends} group send(s)" if sends else "")

    async def drain(self, *_args: object) -> None:
        """``before_server_stop``: refuse new work, finish in-flight work, release sessions."""
        self.draining = True
        install_second_signal_exit(asyncio.get_running_loop())
        if self._reaper is not None:  # leases stop mattering: every session ends below
            self._reaper.cancel()
            self._reaper = None
        start = time.monotonic()
        deadline = start + self.settings.grace_period
        if self.busy():
            logger.info("draining: waiting up to %g s for %s in flight", self.settings.grace_period, self._work_text())
        while self.busy() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.busy():
            self.forced = True
            logger.error(
                "grace period of %g s ran out with %s still in flight; they are cut off",
                self.settings.grace_period,
                self._work_text(),
            )
        else:
            logger.info("drained in %.2f s", time.monotonic() - start)
        for session in self.sessions.registered():
            self.sessions.drop(session.id, reason="shutdown")
        if self._closing:
            await asyncio.wait(set(self._closing), timeout=max(0.1, deadline - time.monotonic()))
        # Sanic then closes idle connections and waits this long for the rest.
        self.app.config.GRACEFUL_SHUTDOWN_TIMEOUT = max(1.0, deadline - time.monotonic())

    def exit_code(self) -> int:
        return 1 if self.forced else 0

    def exit_now_if_forced(self) -> None:
        """After a forced drain a forward may still hold the model thread; do not wait for it."""
        if self.forced:
            logging.shutdown()
            os._exit(1)


def _exit_at_once(signum: int, *_: object) -> None:
    logger.error("%s during the shutdown: exiting at once (exit code 1)", signal.Signals(signum).name)
    logging.shutdown()
    os._exit(1)


def install_second_signal_exit(loop: asyncio.AbstractEventLoop | None = None) -> None:
    """From now on SIGTERM or SIGINT ends the process at once (exit 1): the operator's "now".

    On the loop while it runs (replacing Sanic's stop handler), and as a plain handler for the
    moments after the loop has closed.
    """
    for signum in (signal.SIGTERM, signal.SIGINT):
        if loop is not None:
            try:
                loop.add_signal_handler(signum, _exit_at_once, signum)
                continue
            except (NotImplementedError, RuntimeError, ValueError):  # not the main thread's loop
                pass
        try:
            signal.signal(signum, _exit_at_once)
        except ValueError:  # not the main thread
            pass
