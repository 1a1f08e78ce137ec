"""Start an appliance as a child process and wait until it answers, for the demo, tests and benchmarks."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any, ClassVar, Protocol

import httpx

__all__ = ["ServerProcess", "free_port"]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the kernel's choice for port 0)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class ChildProcess(Protocol):
    """What :class:`ServerProcess` needs of a started child: :class:`subprocess.Popen`'s own calls."""

    pid: int
    returncode: int | None

    def poll(self) -> int | None: ...
    def wait(self, timeout: float | None = None) -> int: ...
    def send_signal(self, sig: int) -> None: ...
    def kill(self) -> None: ...


class ServerProcess:
    """``python -m eagle3_appliance serve ...`` on 127.0.0.1, as a context manager.

    ``launcher`` is the command before ``serve`` (the CLI's module by default).

    Usage::

        with ServerProcess(["--model", "builtin"]) as server:
            httpx.get(server.url + "/health")
    """

    #: How the child is started (``starter(argv, env=, stdout=, stderr=)``): a new interpreter by
    #: default; the test suite forks most of its servers from a process that has already
    #: imported the libraries (``tests/preload.py``).
    starter: ClassVar[Callable[..., Any]] = subprocess.Popen

    def __init__(
        self,
        args: Sequence[str] = (),
        *,
        port: int = 0,
        env: dict[str, str] | None = None,
        log_path: Path | None = None,
        startup_timeout: float = 120.0,
        launcher: Sequence[str] = (sys.executable, "-m", "eagle3_appliance"),
    ) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._args = [
            *launcher,
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            *args,
        ]
        self._env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self._log_path = log_path
        self._timeout = startup_timeout
        self.proc: ChildProcess | None = None
        self._log: IO[bytes] | int | None = None

    @property
    def log_path(self) -> Path | None:
        """Where the server's output goes (None: discarded)."""
        return self._log_path

    def start(self) -> ServerProcess:
        self._log = open(self._log_path, "wb") if self._log_path else subprocess.DEVNULL  # noqa: SIM115
        self.proc = type(self).starter(self._args, env=self._env, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self._timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"appliance exited with {self.proc.returncode} before answering; see {self._log_path}"
                )
            try:
                # The liveness probe needs no token; a server listens only once its model is loaded.
                status = httpx.get(self.url + "/health/live", timeout=1.0, trust_env=False).status_code
                if status == 404:  # a server without the probe
                    status = httpx.get(self.url + "/health", timeout=1.0, trust_env=False).status_code
                if status == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"appliance on port {self.port} not healthy after {self._timeout} s")

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if not isinstance(self._log, (int, type(None))):
            self._log.close()
        return self.proc.returncode

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
