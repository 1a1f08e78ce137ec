"""The container's health probe and the Dockerfile's promises, without Docker.

The image itself is built and run for real by ``.ci/docker.sh``; here the probe script is run
against real HTTP servers on 127.0.0.1 (a scripted stdlib server for each answer a probe can
meet, and a real appliance), and the Dockerfile is read for what the image must keep.
"""

from __future__ import annotations

import importlib.util
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType

import pytest

from eagle3_appliance.launch import ServerProcess, free_port
from eagle3_client import protocol

ROOT = Path(__file__).resolve().parents[1]
PROBE = ROOT / "containers" / "healthcheck.py"
DOCKERFILE = ROOT / "containers" / "Dockerfile"

# path -> (status, body), given the request's Authorization header.
Routes = Callable[[str, str | None], tuple[int, bytes]]


def _load_probe() -> ModuleType:
    spec = importlib.util.spec_from_file_location("eagle3_healthcheck", PROBE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


healthcheck = _load_probe()


@pytest.fixture
def scripted_server() -> Iterator[Callable[[Routes], str]]:
    """Start a stdlib HTTP server on 127.0.0.1 that answers by a given function; yields its URL."""
    servers: list[ThreadingHTTPServer] = []

    def start(routes: Routes) -> str:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
                status, body = routes(self.path, self.headers.get("Authorization"))
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_default_paths_are_the_protocol_probes() -> None:
    assert healthcheck.DEFAULT_PATHS == (
        protocol.path(protocol.EP_HEALTH_READY),
        protocol.path(protocol.EP_HEALTH),
    )


def test_ready_probe_200_is_ready(scripted_server: Callable[[Routes], str]) -> None:
    asked: list[str] = []

    def routes(path: str, auth: str | None) -> tuple[int, bytes]:
        asked.append(path)
        return (200, b'{"status":"ready"}') if path == "/health/ready" else (500, b"")

    ready, reason = healthcheck.probe(scripted_server(routes), list(healthcheck.DEFAULT_PATHS))
    assert (ready, reason) == (True, "/health/ready: 200")
    assert asked == ["/health/ready"]


def test_503_is_not_ready_and_does_not_fall_back(scripted_server: Callable[[Routes], str]) -> None:
    asked: list[str] = []

    def routes(path: str, auth: str | None) -> tuple[int, bytes]:
        asked.append(path)
        return (503, b'{"reason":"model loading"}') if path == "/health/ready" else (200, b"ok")

    ready, reason = healthcheck.probe(scripted_server(routes), list(healthcheck.DEFAULT_PATHS))
    assert not ready
    assert reason == '/health/ready: 503 {"reason":"model loading"}'
    assert asked == ["/health/ready"]  # a 503 is an answer: /health must not override it


def test_404_falls_back_to_plain_health(scripted_server: Callable[[Routes], str]) -> None:
    def routes(path: str, auth: str | None) -> tuple[int, bytes]:
        return (200, b'{"status":"ok"}') if path == "/health" else (404, b"not found")

    assert healthcheck.probe(scripted_server(routes), ["/health/ready", "/health"]) == (True, "/health: 200")


def test_404_everywhere_is_not_ready(scripted_server: Callable[[Routes], str]) -> None:
    url = scripted_server(lambda path, auth: (404, b"nope"))
    assert healthcheck.probe(url, ["/health/ready", "/health"]) == (False, "/health: 404 nope")


def test_no_credentials_are_sent_and_a_401_is_not_ready(scripted_server: Callable[[Routes], str]) -> None:
    """The appliance's probes need no token (tests/test_ops_auth.py); a server that wants one is not ours."""
    seen: list[str | None] = []

    def routes(path: str, auth: str | None) -> tuple[int, bytes]:
        seen.append(auth)
        return 401, b"missing token"

    assert healthcheck.probe(scripted_server(routes), ["/health/ready"]) == (False, "/health/ready: 401 missing token")
    assert seen == [None]


def test_nothing_listening_is_not_ready() -> None:
    ready, reason = healthcheck.probe(f"http://127.0.0.1:{free_port()}", ["/health/ready", "/health"], timeout=2)
    assert not ready
    assert reason.startswith("/health/ready: ") and "refused" in reason.lower()


@pytest.mark.parametrize(
    ("env", "url"),
    [
        ({}, "http://127.0.0.1:8001"),
        ({"EAGLE3_HOST": "0.0.0.0", "EAGLE3_PORT": "9000"}, "http://127.0.0.1:9000"),
        ({"EAGLE3_HOST": "::"}, "http://127.0.0.1:8001"),
        ({"EAGLE3_HOST": "10.1.2.3", "EAGLE3_PORT": "8100"}, "http://10.1.2.3:8100"),
        ({"EAGLE3_HOST": "fd00::7"}, "http://[fd00::7]:8001"),
    ],
)
def test_server_url_follows_the_servers_environment(env: dict[str, str], url: str) -> None:
    assert healthcheck.server_url(env) == url


def _run_probe(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The probe as Docker runs it: a fresh interpreter, the exit code is the verdict."""
    return subprocess.run(
        [sys.executable, str(PROBE), *args], capture_output=True, text=True, timeout=60, env=env, check=False
    )


@pytest.mark.slow
def test_probe_against_a_real_appliance(tmp_path: Path) -> None:
    with ServerProcess(["--model", "builtin", "--cache-dir", str(tmp_path)], log_path=tmp_path / "server.log") as srv:
        done = _run_probe("--url", srv.url)
        # Through EAGLE3_PORT, as inside the container (no --url).
        by_env = _run_probe(env={"EAGLE3_PORT": str(srv.port), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith("ready: /health")
    assert by_env.returncode == 0, by_env.stdout + by_env.stderr
    after = _run_probe("--url", srv.url, "--timeout", "2")
    assert after.returncode == 1
    assert after.stdout.startswith("not ready: /health/ready: ")


def _instructions(name: str) -> list[str]:
    """The arguments of every ``NAME`` instruction in the Dockerfile, continuation lines joined."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    return [line.split(None, 1)[1] for line in text.splitlines() if line.split(None, 1)[:1] == [name]]


def test_dockerfile_keeps_its_promises() -> None:
    assert _instructions("ENTRYPOINT") == ['["eagle3-appliance"]']  # exec form: the CLI is PID 1
    assert _instructions("CMD") == ['["serve"]']
    (user,) = _instructions("USER")
    assert user == "${UID}:${UID}" and "ARG UID=10001" in DOCKERFILE.read_text()
    (check,) = _instructions("HEALTHCHECK")
    assert check.endswith('CMD ["python3", "/usr/local/bin/eagle3-healthcheck"]')
    assert "--start-period=20m" in check
    env = " ".join(_instructions("ENV"))
    assert "HF_HUB_OFFLINE=1" in env and "EAGLE3_PORT=8001" in env
    assert _instructions("ARG")[0].startswith("BASE_IMAGE=pytorch/pytorch:")


@pytest.mark.slow
def test_sigterm_while_loading_exits_0_at_once(tmp_path: Path) -> None:
    """``docker stop`` during a long model load must not wait out its timeout (PID 1 ignores
    signals it has no handler for); here the load is interrupted as soon as it is logged."""
    cmd = [sys.executable, "-m", "eagle3_appliance", "serve", "--port", str(free_port()), "--cache-dir", str(tmp_path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "loading" in line:
            proc.send_signal(signal.SIGTERM)
            break
    lines.extend(proc.stdout)
    assert proc.wait(timeout=60) == 0, "".join(lines)
    assert any("SIGTERM while loading" in line for line in lines) or any("Server Stopped" in line for line in lines)


@pytest.mark.slow
def test_sigterm_while_serving_still_drains(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    server = ServerProcess(["--cache-dir", str(tmp_path)], log_path=log).start()
    # Sanic answers its first requests before it installs its own SIGTERM handler; "Worker
    # ready" is logged after. Until then the loading-time handler is still the one in force.
    deadline = time.monotonic() + 60
    while "Worker ready" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.stop() == 0
    text = log.read_text()
    assert "Server Stopped" in text and "SIGTERM while loading" not in text
