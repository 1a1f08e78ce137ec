"""Which queue backend a URL names: ``appliance://host:port`` or ``redis://host:port/db``."""

from __future__ import annotations

from eagle3_client.streaming.queues import QueueBackend

__all__ = ["open_queue"]


def open_queue(url: str, run_id: str, *, auth_token: str | None = None) -> QueueBackend:
    """The run's queue on the backend ``url`` names (nothing is sent yet)."""
    if url.startswith("appliance://"):
        from eagle3_client.streaming.appliance_queue import ApplianceQueue

        return ApplianceQueue(url, run_id, auth_token=auth_token)
    if url.startswith(("redis://", "rediss://")):
        from eagle3_client.streaming.redis_queue import RedisQueue

        return RedisQueue(url, run_id)
    raise ValueError(f"a queue URL is appliance://host:port or redis://host:port/db, got {url!r}")
