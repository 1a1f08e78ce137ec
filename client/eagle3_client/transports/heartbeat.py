"""Keep a session's lease alive while the trainer lives, from a background thread.

The server drops a session that sends nothing for ``lease_seconds`` (learned from the
``POST /session`` reply). Requests renew it, but a trainer can be silent for minutes
(evaluation, checkpointing), so a daemon thread posts ``/heartbeat`` every third of the
lease. It never takes the server lock, so it keeps beating while a long ``/generate``
runs. A dead process stops beating, which is how the server learns to free its resources.
A 410 answer means the session is gone already: the thread stops, and the next request
registers again.
"""

from __future__ import annotations

import logging
import threading

from eagle3_client import protocol
from eagle3_client.errors import RemoteTargetError, TargetHTTPError
from eagle3_client.transports.control import ControlPlane

__all__ = ["Heartbeat"]

logger = logging.getLogger(__name__)


class Heartbeat:
    """``POST /heartbeat`` for one session every ``interval`` seconds until :meth:`stop`."""

    def __init__(self, control: ControlPlane, session_id: str, interval: float) -> None:
        if interval <= 0:
            raise ValueError(f"heartbeat interval must be positive, got {interval}")
        self.control = control
        self.session_id = session_id
        self.interval = interval
        self.beats = 0  # successful heartbeats, for diagnostics and tests
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

    def stop(self, timeout: float = 1.0) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)
