"""A client may ask for its own session lease; the server grants it within --max-lease-seconds."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from eagle3_appliance.launch import ServerProcess
from eagle3_client import RemoteEagle3TargetModel, protocol
from tests.ops_support import metric, scrape


@pytest.fixture(scope="module")
def lease_server(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> ServerProcess:
    log = tmp_path_factory.mktemp("lease") / "server.log"
    args = ["--cache-dir", str(cache_dir), "--lease-seconds", "600", "--max-lease-seconds", "120"]
    with ServerProcess(args, log_path=log) as proc:
        yield proc


def test_the_granted_lease_is_the_requested_one_or_the_default(lease_server: ServerProcess) -> None:
    with httpx.Client(base_url=lease_server.url, trust_env=False) as http:
        assert http.post("/session", json={"lease_seconds": 2.5}).json()["lease_seconds"] == 2.5
        assert http.post("/session", json={}).json()["lease_seconds"] == 600
        refused = http.post("/session", json={"lease_seconds": 121})
        assert refused.status_code == 422
        assert refused.json()["error"] == "lease_seconds must be a number in (0, 120], got 121"
        assert http.post("/session", json={"lease_seconds": "soon"}).status_code == 422


def test_a_short_lease_expires_while_default_sessions_stay(lease_server: ServerProcess) -> None:
    with httpx.Client(base_url=lease_server.url, trust_env=False) as http:
        short = http.post("/session", json={"lease_seconds": 0.5}).json()["session_id"]
        normal = http.post("/session", json={}).json()["session_id"]
        deadline = time.monotonic() + 30
        status = 200
        while status == 200 and time.monotonic() < deadline:  # bounded: the reaper runs every lease/4
            time.sleep(1.5)  # longer than the lease: each probe would renew a live session
            status = http.post("/heartbeat", headers={protocol.SESSION_HEADER: short}).status_code
        assert status == 410
        assert http.post("/heartbeat", headers={protocol.SESSION_HEADER: normal}).status_code == 200


def test_the_client_asks_for_its_lease_and_keeps_it_alive(
    lease_server: ServerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EAGLE3_LEASE_SECONDS", "1.5")
    with RemoteEagle3TargetModel.from_urls([lease_server.url], max_retries=0) as remote:
        remote.model_info()
        server = remote._servers[0]
        assert server.heartbeat is not None and server.heartbeat.interval == pytest.approx(0.5)
        time.sleep(4)  # several leases: the background heartbeat must have renewed it
        with httpx.Client(base_url=lease_server.url, trust_env=False) as http:
            beat = http.post("/heartbeat", headers={protocol.SESSION_HEADER: server.session_id})
        assert beat.status_code == 200
    with pytest.raises(ValueError, match="lease_seconds must be positive"):
        RemoteEagle3TargetModel.from_urls([lease_server.url], lease_seconds=0)


def test_a_lease_below_the_floor_is_raised_to_it_and_the_client_beats_at_the_floor(
    lease_server: ServerProcess,
) -> None:
    """lease_seconds=0.001 would mean ~3,000 heartbeats a second; the server grants its floor (1 s)."""
    with httpx.Client(base_url=lease_server.url, trust_env=False) as http:
        assert http.post("/session", json={"lease_seconds": 0.001}).json()["lease_seconds"] == 1.0
        assert http.post("/session", json={"lease_seconds": 1.0}).json()["lease_seconds"] == 1.0
        assert http.post("/session", json={"lease_seconds": 0}).status_code == 422  # not a lease at all

    def heartbeats() -> float:
        return metric(scrape(lease_server.url), "eagle3_request_success_total", endpoint=protocol.EP_HEARTBEAT)

    with RemoteEagle3TargetModel.from_urls([lease_server.url], lease_seconds=0.001, max_retries=0) as remote:
        remote.model_info()
        server = remote._servers[0]
        assert server.heartbeat is not None and server.heartbeat.interval == pytest.approx(1.0 / 3)
        before, start = heartbeats(), time.monotonic()
        time.sleep(3.0)
        beats, seconds = heartbeats() - before, time.monotonic() - start
    # Three beats per granted second (about 9 here), where the asked-for lease meant thousands.
    assert 3 <= beats <= 4 * seconds, beats
