"""A real ``redis-server`` for the stream tests: started on a free port, stopped by its pid.

Without ``redis-server`` on PATH the tests that need it skip with the reason, unless
``EAGLE3_REQUIRE_REDIS=1`` (set by ``.ci/redis.sh``), which makes the missing server a failure.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis

from eagle3_appliance.launch import free_port

REQUIRE_ENV = "EAGLE3_REQUIRE_REDIS"
STARTUP_TIMEOUT_S = 20.0


def redis_server_binary() -> str:
    """The path of ``redis-server``, or skip (fail under ``EAGLE3_REQUIRE_REDIS=1``) saying why."""
    found = shutil.which("redis-server")
    if found is None:
        reason = "redis-server is not on PATH (Debian: apt-get install redis-server; .ci/redis.sh does)"
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{reason}, and {REQUIRE_ENV}=1 requires it")
        pytest.skip(reason)
    return found


@contextmanager
def redis_server(log_path: Path) -> Iterator[str]:
    """A throwaway in-memory Redis (no snapshots, no AOF) on 127.0.0.1; yields its ``redis://`` URL."""
    port = free_port()
    args = [redis_server_binary(), "--save", "", "--appendonly", "no", "--port", str(port), "--bind", "127.0.0.1"]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=1.0)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {proc.returncode}; see {log_path}")
            try:
                if client.ping():
                    break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"redis-server on port {port} did not answer PING; see {log_path}") from None
                time.sleep(0.05)
        client.close()
        yield url
    finally:
        proc.kill()
        proc.wait(timeout=10)
