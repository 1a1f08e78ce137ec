"""Keep a session's lease alive while the trainer lives, from a background thread.

The server drops a session that sends nothing for ``lease_seconds`` (learned from the
``POST /session`` reply). Requests renew it, but a trainer can be silent for minutes
(evaluation, checkpointing), so a daemon thread posts ``/heartbeat`` every third of the
lease. It never takes the server lock, so it keeps beating while a long ``/generate``
runs. A dead process stops beating, which is how the server learns to free its resources.
A 410 answer means the session is gone already: the thread stops, and the next request
registers again.

A beat that gets no answer at all (connection refused or reset, no answer within the beat
interval) says the server has stopped answering, perhaps with a request of ours in flight:
``on_failure`` is told at once, so that the fleet can move that request to a ready server
instead of waiting its whole ``/generate`` deadline (:meth:`eagle3_client.remote.fleet.Fleet.suspect`).
An error status (503 while draining, say) is an answer, not a failure.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from eagle3_client import protocol
from eagle3_client.errors import RemoteTargetError, TargetHTTPError, first_line
from eagle3_client.transports.control import ControlPlane

__all__ = ["Heartbeat"]

logger = logging.getLogger(__name__)


class Heartbeat:
    """``POST /heartbeat`` for one session every ``interval`` seconds until :meth:`stop`."""

    def __init__(
        self,
        control: ControlPlane,
        session_id: str,
        interval: float,
        on_failure: Callable[[str], None] | None = None,
    ) -> None:
        if interval <= 0:
            raise ValueError(f"heartbeat interval must be positive, got {interval}")
        self.control = control
        self.session_id = session_id
        self.interval = interval
        self.beats = 0  # successful heartbeats, for diagnostics and tests
        self.on_failure = on_failure  # told why, each time a beat gets no answer
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"eagle3-heartbeat-{session_id[:8]}", daemon=True)

    def start(self) -> Heartbeat:
        self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.control.request(
                    "POST",
                    protocol.EP_HEARTBEAT,
                    ControlPlane.read_json,
                    content=b"{}",
                    content_type=protocol.JSON,
                    headers={protocol.SESSION_HEADER: self.session_id},
                    retries=False,
                    timeout=self.interval,
                )
                self.beats += 1
            except TargetHTTPError as exc:
                if exc.status == 410:
                    logger.info("%s: session %s is gone; heartbeat stops", self.control.url, self.session_id)
                    return
                logger.warning("%s: heartbeat failed: %s", self.control.url, exc)
            except RemoteTargetError as exc:  # unreachable for now: keep trying until stopped
                logger.warning("%s: heartbeat failed: %s", self.control.url, exc)
                if self.on_failure is not None and not self._stop.is_set():
                    try:
                        self.on_failure(f"heartbeat failed: {first_line(exc, 200)}")
                    except Exception:  # noqa: BLE001 - the beat goes on whatever the listener does
                        logger.exception("%s: heartbeat failure handler failed", self.control.url)

    def stop(self, timeout: float = 1.0) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)
