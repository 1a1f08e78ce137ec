"""The model a client trains against, pinned at its first session and checked on every later one.

A server can be restarted on the same address with another checkpoint; the client then learns
it only from the new session's fingerprint. Every session a client registers (first connect,
re-registration after a 410, re-admission after a failover, a server that joins from the list)
goes through :meth:`ModelPin.check`, so no path can use another model's answers silently.
"""

from __future__ import annotations

import threading

from eagle3_client.errors import ModelMismatch

__all__ = ["ModelPin"]


class ModelPin:
    """The fleet's model fingerprint: the first one seen, then the one every server must report.

    Shared by the sessions of one client (thread-safe). Servers that report no fingerprint
    (upstream's) are neither pinned nor checked.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pinned: tuple[str, str] | None = None  # (fingerprint, the URL it was first seen on)

    @property
    def fingerprint(self) -> str | None:
        with self._lock:
            return None if self._pinned is None else self._pinned[0]

    def check(self, url: str, fingerprint: str | None) -> None:
        """Pin ``fingerprint`` if nothing is pinned yet; :class:`ModelMismatch` if it differs from the pin."""
        if fingerprint is None:
            return
        with self._lock:
            if self._pinned is None:
                self._pinned = (fingerprint, url)
                return
            expected, where = self._pinned
        if fingerprint == expected:
            return
        fingerprints = {where: expected, url: fingerprint}
        if where == url:  # the same address, another model (restarted with another checkpoint)
            fingerprints = {url: fingerprint}
        raise ModelMismatch(
            f"{url} serves another model: fingerprint {fingerprint}, the client's is {expected} (from {where}); "
            "every server of one trainer must load the same checkpoint with the same dtype, aux layers and loader "
            "mode, so that server is not used",
            fingerprints,
        )
