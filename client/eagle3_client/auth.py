"""The bearer-token header of the client (the token itself is an option: ``token`` / ``token_file``)."""

from __future__ import annotations

from eagle3_client.protocol import AUTH_HEADER

__all__ = ["auth_headers"]


def auth_headers(token: str | None) -> dict[str, str]:
    """``{"Authorization": "Bearer <token>"}``, or no header without a token."""
    return {AUTH_HEADER: f"Bearer {token}"} if token else {}
