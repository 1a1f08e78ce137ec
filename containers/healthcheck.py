#!/usr/bin/env python3
"""Container health probe: exit 0 when the appliance in this container is ready, else 1.

Docker's HEALTHCHECK runs this inside the container every interval, so it must start in
milliseconds and depend on nothing but the standard library (importing the appliance would
import torch). It asks the readiness probe first and falls back to the plain health
endpoint when the server is too old to have one (404). It reads the same environment as
the server (``EAGLE3_PORT``, ``EAGLE3_HOST``), so a container configured through the
environment is probed where it listens. It sends no credentials: the appliance answers its
probes without a token even when ``--auth-token``/``--auth-token-file`` protects the rest.

Usage::

    eagle3-healthcheck [PATH ...]          # default: /health/ready /health
    eagle3-healthcheck --url http://127.0.0.1:8001 /health/ready /health
"""

from __future__ import annotations

import argparse
import os
import sys
import urllib.error
import urllib.request

__all__ = ["DEFAULT_PATHS", "main", "probe", "server_url"]

# eagle3_client.protocol.path(EP_HEALTH_READY) and path(EP_HEALTH), spelled out because importing the
# client package imports torch; tests/test_container.py keeps the two in step.
DEFAULT_PATHS = ("/health/ready", "/health")
# Addresses a server binds to that are not addresses one can connect to.
_WILDCARD_HOSTS = {"", "0.0.0.0", "::", "[::]"}


def server_url(env: dict[str, str]) -> str:
    """Where the server of this container listens, from its own ``EAGLE3_*`` settings."""
    host = env.get("EAGLE3_HOST", "")
    host = "127.0.0.1" if host in _WILDCARD_HOSTS else host
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # an IPv6 literal
    return f"http://{host}:{env.get('EAGLE3_PORT', '8001')}"


def probe(url: str, paths: list[str], timeout: float = 5.0) -> tuple[bool, str]:
    """Ask each path in turn; a 404 means "not this server's spelling", so try the next.

    Returns (ready, reason): ready only on a 2xx answer; any other status, a refused
    connection or a timeout is "not ready", with the reason Docker keeps in its health log.
    """
    # No proxy: the probe talks to its own container, whatever proxy is set for the model hub.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    reason = "no path to probe"
    for path in paths:
        request = urllib.request.Request(url.rstrip("/") + path)
        try:
            with opener.open(request, timeout=timeout) as response:
                return True, f"{path}: {response.status}"
        except urllib.error.HTTPError as exc:
            reason = f"{path}: {exc.code} {exc.read(500).decode('utf-8', 'replace').strip()}"
            if exc.code != 404:
                return False, reason
        except (urllib.error.URLError, OSError) as exc:
            return False, f"{path}: {getattr(exc, 'reason', exc)}"
    return False, reason


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Exit 0 when the appliance answers its readiness probe.")
    parser.add_argument("paths", nargs="*", default=list(DEFAULT_PATHS), help="Paths to try, in order.")
    parser.add_argument("--url", default=None, help="Server URL (default: from EAGLE3_HOST / EAGLE3_PORT).")
    parser.add_argument("--timeout", type=float, default=5.0, help="Seconds per request.")
    args = parser.parse_args(argv)
    ready, reason = probe(args.url or server_url(dict(os.environ)), args.paths, args.timeout)
    print(("ready: " if ready else "not ready: ") + reason)
    return 0 if ready else 1


if __name__ == "__main__":
    sys.exit(main())
