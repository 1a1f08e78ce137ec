"""The client side of bearer-token auth: where the token comes from and the header it makes.

The token is the ``token=`` argument of :meth:`RemoteEagle3TargetModel.from_urls`, else the
environment: ``EAGLE3_AUTH_TOKEN``, or a file named by ``EAGLE3_AUTH_TOKEN_FILE`` (the same
variables the server reads, so one job script configures both ends).
"""

from __future__ import annotations

import os
from pathlib import Path

from eagle3_client.protocol import AUTH_HEADER

__all__ = ["ENV_AUTH_TOKEN", "ENV_AUTH_TOKEN_FILE", "auth_headers", "resolve_token"]

ENV_AUTH_TOKEN = "EAGLE3_AUTH_TOKEN"
ENV_AUTH_TOKEN_FILE = "EAGLE3_AUTH_TOKEN_FILE"


def resolve_token(token: str | None) -> str | None:
    """``token`` if given, else ``$EAGLE3_AUTH_TOKEN``, else the content of ``$EAGLE3_AUTH_TOKEN_FILE``."""
    if token:
        return token.strip()
    value = os.environ.get(ENV_AUTH_TOKEN, "").strip()
    if value:
        return value
    path = os.environ.get(ENV_AUTH_TOKEN_FILE, "").strip()
    if path:
        try:
            return Path(path).read_text().strip() or None
        except OSError as exc:
            raise ValueError(
                f"cannot read the auth token file {path} (${ENV_AUTH_TOKEN_FILE}): {exc.strerror}"
            ) from None
    return None


def auth_headers(token: str | None) -> dict[str, str]:
    """``{"Authorization": "Bearer <token>"}``, or no header without a token."""
    return {AUTH_HEADER: f"Bearer {token}"} if token else {}
