"""The fleet fault: a spare appliance that this Locust process starts, kills with SIGKILL and restarts.

While the spare is down, a rank that uses the real client over ``[--host, spare]`` must keep
getting valid answers (failover to ``--host``); once the spare is back, the client must take it
into its rotation again (re-admission) and send it batches. Every wait is bounded: the spare's
start (``--spare-start-timeout``), the re-admission (the client's longest probe interval plus
a margin) and the batches the spare must serve after it.

The spare is started from ``--spare-server-cmd`` (``{port}`` and ``{python}`` are filled in),
a command, not an import: the load-test package never imports the server's.
"""

from __future__ import annotations

import shlex
import signal
import socket
import subprocess
import sys
import time

import httpx

__all__ = ["DEFAULT_SPARE_COMMAND", "SpareServer"]

DEFAULT_SPARE_COMMAND = "{python} -m eagle3_appliance serve --host 127.0.0.1 --port {port} --model builtin"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class SpareServer:
    """One appliance process on a fixed port: start (and wait until ready), kill, restart, stop."""

    def __init__(self, command: str, start_timeout: float) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = shlex.split(command.format(port=self.port, python=sys.executable))
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> float:
        """Start it and wait until ``/health/ready`` answers 200; the seconds that took."""
        began = time.monotonic()
        self.proc = subprocess.Popen(self.command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the spare server exited with {self.proc.returncode} before it was ready")
            try:
                if httpx.get(self.url + "/health/ready", timeout=1.0, trust_env=False).status_code == 200:
                    return time.monotonic() - began
            except httpx.TransportError:
                pass
            if time.monotonic() - began > self.start_timeout:
                self.stop()
                raise RuntimeError(f"the spare server was not ready within {self.start_timeout:g} s")
            time.sleep(0.2)

    def kill(self) -> None:
        """SIGKILL: no drain, no goodbye, connections reset (what a crashed node looks like)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(30)
