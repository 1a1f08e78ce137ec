"""Client sessions: what the server keeps per connected trainer rank.

A session holds a client's draft-vocabulary mapping and the choices it negotiated
(supervision encoding, data plane). Our client registers one with ``POST /session`` and
names it in the ``X-Eagle3-Session`` header of every request. Requests without the header
belong to the *anonymous* session, which is exactly upstream's server state: one shared
vocab mapping, never expiring. That keeps unmodified upstream clients working unchanged.

Leases: every request of a session renews it; a session silent for longer than the lease
is dropped (:meth:`SessionRegistry.expire`). Dropping a session closes its ``extras``:
anything there with a ``close()`` method is closed (synchronously, possibly from a worker
thread), which is how a per-session data plane releases its process group.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

from eagle3_appliance.core.inputs import VocabMapping
from eagle3_appliance.errors import ApplianceError
from eagle3_client.capture import EAGLE3, Capture

__all__ = ["ANONYMOUS", "Session", "SessionGone", "SessionRegistry"]

logger = logging.getLogger(__name__)

ANONYMOUS = "anonymous"


class SessionGone(ApplianceError):
    """The named session does not exist (never registered, expired or disconnected)."""

    status_code = 410


@dataclass
class Session:
    """One client's server-side state."""

    id: str
    client: str = ""
    created: float = field(default_factory=time.monotonic)
    last_seen: float = field(default_factory=time.monotonic)
    mapping: VocabMapping | None = None
    encoding: str = "probs"
    lease_seconds: float | None = None  # the client's own lease; None = the server's default
    capture: Capture = EAGLE3  # what every /generate of this session captures (negotiated in /session)
    # Request extensions granted in POST /session (protocol.CAPABILITIES); none for the anonymous session.
    capabilities: frozenset[str] = frozenset()
    # Free-form per-session resources owned by optional features (a data plane, ...).
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def anonymous(self) -> bool:
        return self.id == ANONYMOUS

    def touch(self) -> None:
        self.last_seen = time.monotonic()

    def close(self) -> None:
        """Close every extra that has a ``close()``; one failing does not keep the others open."""
        for name, extra in list(self.extras.items()):
            close = getattr(extra, "close", None)
            if callable(close):
                try:
                    close()
                except Exception:  # noqa: BLE001 - release the rest regardless
                    logger.exception("session %s: closing %s failed", self.id, name)


class SessionRegistry:
    """All sessions of one server, keyed by id. Used only from the event loop (no locking)."""

    def __init__(self) -> None:
        self._sessions: dict[str, Session] = {ANONYMOUS: Session(id=ANONYMOUS, client="upstream")}
        # Called as fn(session, reason) after a session is removed ("disconnect", "expired", ...).
        self.on_drop: list[Callable[[Session, str], None]] = []

    def register(self, client: str = "") -> Session:
        session = Session(id=secrets.token_hex(8), client=client)
        self._sessions[session.id] = session
        return session

    def get(self, session_id: str | None) -> Session:
        """The session a request belongs to; a missing header means the anonymous one."""
        session = self._sessions.get(session_id or ANONYMOUS)
        if session is None:
            raise SessionGone(f"session {session_id!r} is unknown or has expired; register again with POST /session")
        session.touch()
        return session

    def touch(self, session_id: str | None) -> None:
        """Renew a session's lease if it still exists (at the end of a long request)."""
        session = self._sessions.get(session_id or ANONYMOUS)
        if session is not None:
            session.touch()

    def drop(self, session_id: str, reason: str = "disconnect") -> Session | None:
        if session_id == ANONYMOUS:
            return None
        session = self._sessions.pop(session_id, None)
        if session is not None:
            for fn in self.on_drop:
                fn(session, reason)
        return session

    def expire(self, lease_seconds: float, *, busy: Collection[str] = (), now: float | None = None) -> list[Session]:
        """Drop every session silent for longer than the lease, except those with a request open."""
        now = time.monotonic() if now is None else now
        stale = [
            s.id
            for s in self.registered()
            if now - s.last_seen > (s.lease_seconds or lease_seconds) and s.id not in busy
        ]
        return [s for s in (self.drop(sid, reason="expired") for sid in stale) if s is not None]

    def registered(self) -> list[Session]:
        """Every session except the anonymous one."""
        return [s for s in self._sessions.values() if not s.anonymous]
