"""Optional bearer-token auth: who may use (or disconnect, or scrape) a shared target server.

The token comes from ``--auth-token`` (or ``EAGLE3_AUTH_TOKEN``) or from a file named by
``--auth-token-file`` (or ``EAGLE3_AUTH_TOKEN_FILE``), which keeps it out of ``ps`` and
job scripts (:func:`eagle3_appliance.settings.load_token`). When set, every endpoint except the health probes
(:data:`eagle3_appliance.ops.health.PROBE_ENDPOINTS`) needs
``Authorization: Bearer <token>``; the check runs right after routing, before the request
body is read, so an unauthenticated client cannot make the server buffer a large body.
Tokens are compared through SHA-256 digests with :func:`hmac.compare_digest`, which takes
the same time whatever the guess and whatever its length.

An unmodified upstream client cannot send a token: run such clients against a server
without one (on a private network), or put an authenticating proxy in front.
"""

from __future__ import annotations

import hashlib
import hmac

from eagle3_appliance.errors import Unauthorized
from eagle3_client.protocol import AUTH_HEADER

__all__ = ["BearerAuth"]


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode()).digest()


class BearerAuth:
    """Checks ``Authorization: Bearer <token>`` headers against one configured token."""

    def __init__(self, token: str) -> None:
        self._digest = _digest(token)

    def check(self, header: str | None) -> None:
        """Raise :class:`Unauthorized` (401, with ``WWW-Authenticate``) unless the header carries the token."""
        if not header:
            raise Unauthorized(
                f"this server requires a bearer token: send '{AUTH_HEADER}: Bearer <token>'",
                headers={"WWW-Authenticate": 'Bearer realm="eagle3-appliance"'},
            )
        scheme, _, given = header.strip().partition(" ")
        ok = scheme.lower() == "bearer" and hmac.compare_digest(_digest(given.strip()), self._digest)
        if not ok:
            raise Unauthorized(
                "invalid bearer token",
                headers={"WWW-Authenticate": 'Bearer realm="eagle3-appliance", error="invalid_token"'},
            )
