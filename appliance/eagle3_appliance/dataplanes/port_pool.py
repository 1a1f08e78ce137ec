"""Rendezvous ports for the per-session groups: the configured range, or the kernel's choice."""

from __future__ import annotations

import threading
from typing import Any

from eagle3_appliance.errors import Unavailable
from eagle3_client.transports.transfer import (
    host_store,
)

__all__ = ["PortPool"]


class PortPool:
    """Rendezvous ports: the configured range (firewalls between nodes), else the kernel's choice.

    Ports taken by our own live groups are skipped; a port some other process holds fails to
    bind and the next one is tried. The search starts after the last port handed out, so a
    just-released port is the last to be reused.
    """

    def __init__(self, port_range: tuple[int, int] | None) -> None:
        self.range = port_range
        self._in_use: set[int] = set()
        self._next = 0
        self._lock = threading.Lock()

    def open_store(self, host: str, timeout: float) -> tuple[Any, int]:
        """A listening rendezvous store and its port (blocking; run off the event loop)."""
        if self.range is None:
            store = host_store(host, 0, timeout)
            with self._lock:
                self._in_use.add(int(store.port))
            return store, int(store.port)
        first, last = self.range
        count = last - first + 1
        for i in range(count):
            with self._lock:
                port = first + (self._next + i) % count
                if port in self._in_use:
                    continue
                self._in_use.add(port)
            try:
                store = host_store(host, port, timeout)
            except RuntimeError:  # held by another process
                self.release(port)
                continue
            with self._lock:
                self._next = (port - first + 1) % count
            return store, port
        raise Unavailable(f"every data-plane port in {first}-{last} is in use; widen --data-plane-ports")

    def release(self, port: int) -> None:
        with self._lock:
            self._in_use.discard(port)

    def __len__(self) -> int:
        return len(self._in_use)
