"""Appliance servers for the test suite, forked from a process that has already imported them.

Each ``eagle3-appliance serve`` spends about 3 s of CPU importing torch and transformers before
it does anything; the suite starts about 90 servers. A test worker therefore keeps one
*preloader*: a child process that imports the server's libraries once, does nothing else (no
tensor op, one thread) and forks a server whenever the worker asks. The forked server then runs
exactly what ``python -m eagle3_appliance serve ARGS`` runs, from the module's ``__main__``
onwards, in the environment and folder the test asked for, with its output in the test's log.

Only starts that a fresh interpreter would run identically are forked: the default launcher,
and an environment that differs from the preloader's only in variables read after start-up
(:data:`RUN_TIME_ENV_PREFIXES`). Anything else (a fake ``pynvml`` on ``PYTHONPATH``, another
launcher) is started with :class:`subprocess.Popen` as before. The servers that the command-line
tests, the wheel test, the container tests and the Locust tests start are fresh interpreters
too. ``TEST_SERVERS_PRELOADED=0`` turns the preloader off.

The worker talks to its preloader over a socket pair, one line of JSON each way:
``{"argv", "env", "cwd"}`` plus the log's file descriptor, answered ``{"spawned": pid}``; later
``{"exit": pid, "code": c}`` when that server ends (``-N`` for a signal, as Popen reports it).
The preloader reaps its children; a server's pid is real, so tests signal it directly.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from eagle3_appliance.launch import ServerProcess

#: Environment variables that the appliance reads only once it runs (settings, test bookkeeping),
#: so a forked server and a fresh one see the same thing.
RUN_TIME_ENV_PREFIXES = ("EAGLE3_", "PYTEST_")
#: What the preloader imports: the server's command line, its HTTP app, the model loader and the
#: built-in model's modelling code.
PRELOAD_MODULES = (
    "torch",
    "transformers",
    "eagle3_appliance.cli",
    "eagle3_appliance.serving.server",
    "eagle3_appliance.model.loading",
    "transformers.models.llama.modeling_llama",
)
SWITCH = "TEST_SERVERS_PRELOADED"
REPO = Path(__file__).resolve().parents[1]
_READY_TIMEOUT_S = 120.0


class PreloadedProcess:
    """The part of :class:`subprocess.Popen` that tests use, for a server the preloader forked."""

    def __init__(self, pid: int, args: Sequence[str], preloader: Preloader) -> None:
        self.pid = pid
        self.args = list(args)
        self.returncode: int | None = None
        self._preloader = preloader

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self._preloader.exit_code(self.pid, timeout=0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            code = self._preloader.exit_code(self.pid, timeout=timeout)
            if code is None:
                raise subprocess.TimeoutExpired(self.args, timeout or 0)
            self.returncode = code
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:  # not reaped yet, so the pid is still this server's
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class Preloader:
    """One preloader process for this test worker, and the servers it has forked."""

    def __init__(self) -> None:
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        ours, theirs = socket.socketpair()
        self._log = tempfile.NamedTemporaryFile(prefix="preloader-", suffix=".log", delete=False)  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.preload", str(theirs.fileno())],
            cwd=REPO,
            pass_fds=[theirs.fileno()],
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        theirs.close()
        self._sock = ours
        self._lines = ours.makefile("r", encoding="utf-8")
        self._lock = threading.Lock()  # one spawn at a time
        self._changed = threading.Condition()
        self._spawned: list[int] = []
        self._exits: dict[int, int] = {}
        self._closed = False
        self._sock.settimeout(_READY_TIMEOUT_S)
        try:
            ready = json.loads(self._lines.readline() or "{}").get("ready") is True
        except (OSError, ValueError):
            ready = False
        if not ready:
            self.proc.kill()
            self.proc.wait()
            raise RuntimeError(f"the server preloader did not start; see {self._log.name}")
        self._sock.settimeout(None)
        threading.Thread(target=self._read, name="preloader-reader", daemon=True).start()

    def spawn(self, argv: Sequence[str], env: Mapping[str, str], stdout: IO[bytes] | int | None) -> PreloadedProcess:
        with contextlib.ExitStack() as stack:
            if isinstance(stdout, int) or stdout is None:
                out = stack.enter_context(open(os.devnull, "wb"))  # noqa: SIM115
            else:
                out = stdout
            request = {"argv": list(argv[3:]), "env": dict(env), "cwd": os.getcwd()}
            with self._lock:
                socket.send_fds(self._sock, [json.dumps(request).encode() + b"\n"], [out.fileno()])
                pid = self._next_spawned()
        return PreloadedProcess(pid, argv, self)

    def exit_code(self, pid: int, timeout: float | None) -> int | None:
        with self._changed:
            self._changed.wait_for(lambda: pid in self._exits or self._closed, timeout)
            if pid not in self._exits and self._closed:
                raise RuntimeError(f"the server preloader died; see {self._log.name}")
            return self._exits.get(pid)

    def close(self) -> None:
        """Ends the preloader; it kills any server it forked that is still running."""
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)  # the reader's file object holds the socket open
        self._sock.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(30)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.close()
        os.unlink(self._log.name)

    def _next_spawned(self) -> int:
        with self._changed:
            self._changed.wait_for(lambda: bool(self._spawned) or self._closed, _READY_TIMEOUT_S)
            if not self._spawned:
                raise RuntimeError(f"the server preloader did not answer; see {self._log.name}")
            return self._spawned.pop(0)

    def _read(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            for line in self._lines:
                message = json.loads(line)
                with self._changed:
                    if "spawned" in message:
                        self._spawned.append(int(message["spawned"]))
                    else:
                        self._exits[int(message["exit"])] = int(message["code"])
                    self._changed.notify_all()
        with self._changed:
            self._closed = True
            self._changed.notify_all()


class PreloadingStarter:
    """A :attr:`ServerProcess.starter`: forks from this worker's preloader where that is exact.

    The preloader starts on first use (a worker may start no server at all) and once only,
    also when tests start servers from several threads at once.
    """

    def __init__(self, plain: Callable[..., Any]) -> None:
        self.plain = plain
        self._preloader: Preloader | None = None
        self._starting = threading.Lock()

    @property
    def preloader(self) -> Preloader:
        with self._starting:
            if self._preloader is None:
                self._preloader = Preloader()
            return self._preloader

    def __call__(self, argv: Sequence[str], *, env: dict[str, str], stdout: Any, stderr: Any) -> Any:
        preloader = self.preloader
        if forks_exactly(argv, env, preloader.env):
            return preloader.spawn(argv, env, stdout)
        return self.plain(argv, env=env, stdout=stdout, stderr=stderr)

    def close(self) -> None:
        if self._preloader is not None:
            self._preloader.close()


def forks_exactly(argv: Sequence[str], env: Mapping[str, str], preloaded_env: Mapping[str, str]) -> bool:
    """Whether a fresh ``python -m eagle3_appliance`` would run exactly as one forked from a
    preloader started in ``preloaded_env``: the default launcher, and no difference in a
    variable read at start-up. ``PYTHONPATH`` counts as equal when it only adds the repository,
    which is on the path of both already (the folder pytest and the servers run from).
    """
    if list(argv[:3]) != [sys.executable, "-m", "eagle3_appliance"]:
        return False
    for key in set(env) | set(preloaded_env):
        mine, theirs = env.get(key), preloaded_env.get(key)
        if mine == theirs or key.startswith(RUN_TIME_ENV_PREFIXES):
            continue
        if key == "PYTHONPATH" and _search_path(mine) == _search_path(theirs):
            continue
        return False
    return True


def _search_path(value: str | None) -> list[str]:
    return [p for p in (value or "").split(os.pathsep) if p and Path(p).resolve() != REPO]


@contextlib.contextmanager
def preloaded_servers() -> Iterator[PreloadingStarter | None]:
    """Make :class:`ServerProcess` fork its servers from a preloader where that is exact."""
    if os.environ.get(SWITCH, "1") == "0":
        yield None
        return
    starter = PreloadingStarter(ServerProcess.starter)
    ServerProcess.starter = starter
    try:
        yield starter
    finally:
        ServerProcess.starter = starter.plain
        starter.close()


# -- the preloader process ----------------------------------------------------------------------


def _flush_all() -> None:
    """Empty Python's and C's output buffers, so that no child inherits (and repeats) their text."""
    import ctypes

    sys.stdout.flush()
    sys.stderr.flush()
    ctypes.CDLL(None).fflush(None)


def _serve_forever(sock: socket.socket) -> None:
    """Answer spawn requests until the worker closes its end; reap and report every child."""
    children: set[int] = set()
    sock.setblocking(True)
    sock.settimeout(0.05)
    buffered = b""
    fds: list[int] = []
    try:
        while True:
            _report_exits(sock, children)
            try:
                data, received, _flags, _addr = socket.recv_fds(sock, 1 << 20, 4)
            except TimeoutError:
                continue
            if not data:
                return
            buffered += data
            fds += received
            while b"\n" in buffered:
                line, buffered = buffered.split(b"\n", 1)
                log_fd = fds.pop(0)
                _flush_all()
                pid = os.fork()
                if pid == 0:
                    sock.close()
                    _run_server(json.loads(line), log_fd)  # never returns
                os.close(log_fd)
                children.add(pid)
                sock.sendall(json.dumps({"spawned": pid}).encode() + b"\n")
    finally:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _report_exits(sock: socket.socket, children: set[int]) -> None:
    for pid in list(children):
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            children.discard(pid)
            sock.sendall(json.dumps({"exit": pid, "code": os.waitstatus_to_exitcode(status)}).encode() + b"\n")


def _run_server(request: dict[str, Any], log_fd: int) -> None:
    """In the forked child: become ``python -m eagle3_appliance ARGV`` and never return."""
    code = 1
    try:
        # Signal handlers are the interpreter's own, as in a fresh one (the preloader sets none).
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        os.close(null)
        os.close(log_fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        sys.argv = [sys.argv[0], *request["argv"]]
        import runpy

        runpy.run_module("eagle3_appliance", run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        if not isinstance(stop.code, (int, type(None))):
            print(stop.code, file=sys.stderr)
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            atexit._run_exitfuncs()  # as a fresh interpreter's exit would
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def main() -> None:
    import importlib

    sock = socket.socket(fileno=int(sys.argv[1]))
    for name in PRELOAD_MODULES:
        importlib.import_module(name)
    # Keep the collector of each forked server off these objects: a full collection would
    # otherwise write to (and so copy) every inherited page, a pause a fresh server never has.
    gc.collect()
    gc.freeze()
    sock.sendall(b'{"ready": true}\n')
    _serve_forever(sock)


if __name__ == "__main__":
    main()
