"""The fleet's decisions without a model: routing, failover, probing, re-admission, fingerprints, the list.

Servers here are scripted httpx transports (like ``tests/test_client.py``); the fleet tests
with real server processes are in ``tests/test_fleet.py``.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

from eagle3_client import (
    ModelMismatch,
    NoServerReady,
    RemoteEagle3TargetModel,
    TargetHTTPError,
    TargetTimeout,
    protocol,
    wire,
)
from eagle3_client.remote.fleet import IDLE_HALF_LIFE_S, READY, Fleet, Member, ServerList, parse_server_list
from eagle3_client.transports.control import ControlPlane
from tests.ops_support import wait_until
from tests.test_client import SUPERVISION

INPUTS = (torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 3), torch.ones(1, 3))
FAST = {"probe_interval": 0.05, "probe_max_interval": 0.2}


class ScriptedServer:
    """One of our servers, scripted: ``up`` switches it on and off; every request is recorded."""

    def __init__(self, name: str, fingerprint: str = "sha256:same") -> None:
        self.name = name
        self.up = True
        self.fingerprint = fingerprint
        self.generate_status = 200
        self.generate_hangs = False  # every /generate times out (a slow request)
        self.health_hangs = False  # the readiness probe times out too (a frozen server)
        self.request_timeout: float | None = None  # the --request-timeout its session reply names
        self.sessions = 0
        self.requests: list[httpx.Request] = []
        self.lock = threading.Lock()

    def __call__(self, request: httpx.Request) -> httpx.Response:
        with self.lock:
            self.requests.append(request)
        if not self.up:
            raise httpx.ConnectError("connection refused", request=request)
        path = request.url.path.lstrip("/")
        if path == protocol.EP_SESSION:
            with self.lock:
                self.sessions += 1
                sid = f"{self.name}-{self.sessions}"
            reply = protocol.SessionReply(
                session_id=sid, model_fingerprint=self.fingerprint, request_timeout=self.request_timeout
            )
            return httpx.Response(200, json=reply.to_json())
        if path == protocol.EP_GENERATE:
            if self.generate_hangs:
                raise httpx.ReadTimeout("timed out", request=request)
            if self.generate_status != 200:
                return httpx.Response(self.generate_status, json={"error": "scripted failure"})
            version = self.mapping_version()
            headers = {protocol.MAPPING_VERSION_HEADER: version} if version else {}
            return httpx.Response(200, content=wire.encode(SUPERVISION), headers=headers)
        if path in (protocol.EP_HEALTH_READY, protocol.EP_HEALTH):
            if self.health_hangs:
                raise httpx.ReadTimeout("timed out", request=request)
            return httpx.Response(200, json={"status": "ready"})
        if path == protocol.EP_MODEL_INFO:
            return httpx.Response(200, json={"num_hidden_layers": 8, "vocab_size": 9, "name": self.name})
        return httpx.Response(200, json={"status": "ok"})

    def mapping_version(self) -> str | None:
        sent = [r for r in self.requests if r.url.path == "/set_vocab_mapping"]
        return sent[-1].headers.get(protocol.MAPPING_VERSION_HEADER) if sent else None

    def paths(self) -> list[str]:
        with self.lock:
            return [r.url.path for r in self.requests]


def fleet_of(*servers: ScriptedServer, max_retries: int = 0, **options: object) -> RemoteEagle3TargetModel:
    urls = [f"http://{s.name}:8001" for s in servers]
    remote = RemoteEagle3TargetModel.from_urls(urls, backoff=0.0, max_retries=max_retries, **{**FAST, **options})
    for server, scripted in zip(remote._servers, servers, strict=True):
        server.control = ControlPlane(
            server.control.url, max_retries=max_retries, backoff=0.0, transport=httpx.MockTransport(scripted)
        )
    return remote


def stats(remote: RemoteEagle3TargetModel) -> dict[str, dict]:
    return {entry["url"].split("//")[1].split(":")[0]: entry for entry in remote.transport_stats()}


def test_a_failed_server_is_left_the_request_goes_elsewhere_and_it_comes_back_with_a_new_session() -> None:
    a, b = ScriptedServer("a"), ScriptedServer("b")
    remote = fleet_of(a, b)
    try:
        remote.set_vocab_mapping(torch.arange(5), torch.ones(9, dtype=torch.bool))
        a.up = False
        for _ in range(4):  # whichever server is picked, every batch arrives
            batch = remote.generate_batch(*INPUTS)
            assert torch.equal(batch.target_probs, SUPERVISION["target_probs"])
        assert stats(remote)["a"]["state"] == "out" and "connection refused" in stats(remote)["a"]["reason"]
        assert stats(remote)["a"]["failovers"] >= 1 and stats(remote)["b"]["served"] >= 4
        a.up = True
        wait_until(lambda: stats(remote)["a"]["state"] == READY, timeout=10, what="re-admission")
        assert stats(remote)["a"]["readmissions"] == 1
        sessions = [r for r in a.requests if r.url.path == "/session"]
        assert len(sessions) == 2 and sessions[1].read() and b'"rejoin":true' in sessions[1].content
        # The mapping was replayed on the new session, with its version.
        mappings = [r for r in a.requests if r.url.path == "/set_vocab_mapping"]
        assert len(mappings) == 2 and mappings[0].content == mappings[1].content
        assert mappings[1].headers[protocol.SESSION_HEADER] == "a-2"
        assert mappings[1].headers[protocol.MAPPING_VERSION_HEADER] == "1"
        served = stats(remote)["a"]["served"]
        for _ in range(6):
            remote.generate_batch(*INPUTS)
        assert stats(remote)["a"]["served"] > served  # used again
    finally:
        remote.close()


def test_a_failed_over_request_names_itself_to_the_next_server() -> None:
    a, b = ScriptedServer("a"), ScriptedServer("b")
    remote = fleet_of(a, b)
    try:
        remote.set_vocab_mapping(torch.arange(5), torch.ones(9, dtype=torch.bool))
        a.generate_status = 503  # draining: the first pick (a, first in the list) refuses
        batch = remote.generate_batch(*INPUTS)
        assert torch.equal(batch.aux_hidden_states, SUPERVISION["aux_hidden_states"])
    finally:
        remote.close()
    first = [r for r in a.requests if r.url.path == "/generate"]
    second = [r for r in b.requests if r.url.path == "/generate"]
    assert len(first) == 1 and protocol.FAILOVER_HEADER not in first[0].headers
    assert len(second) == 1 and second[0].headers[protocol.FAILOVER_HEADER] == "2"


def test_when_no_server_is_ready_the_error_names_every_server_after_the_failover_timeout() -> None:
    a, b = ScriptedServer("a"), ScriptedServer("b")
    remote = fleet_of(a, b, failover_timeout=1.0)
    try:
        remote.set_vocab_mapping(torch.arange(5), torch.ones(9, dtype=torch.bool))
        a.up = b.up = False
        started = time.monotonic()
        with pytest.raises(NoServerReady) as info:
            remote.generate_batch(*INPUTS)
        waited = time.monotonic() - started
    finally:
        remote.close()
    assert waited >= 1.0  # it waited for the timeout (not a performance claim: a lower bound)
    assert set(info.value.reasons) == {"http://a:8001", "http://b:8001"}
    text = str(info.value)
    assert "failover_timeout" in text and "http://a:8001: out for" in text and "http://b:8001: out for" in text
    assert "connection refused" in text


def test_a_request_error_is_raised_not_failed_over() -> None:
    a, b = ScriptedServer("a"), ScriptedServer("b")
    a.generate_status = b.generate_status = 422
    remote = fleet_of(a, b)
    try:
        remote.set_vocab_mapping(torch.arange(5), torch.ones(9, dtype=torch.bool))
        with pytest.raises(TargetHTTPError) as info:
            remote.generate_batch(*INPUTS)
        assert info.value.status == 422
        assert [e["state"] for e in remote.transport_stats()] == ["ready", "ready"]
        assert sum(p == "/generate" for s in (a, b) for p in s.paths()) == 1
    finally:
        remote.close()


@pytest.mark.parametrize("max_retries", [0, 2])
def test_a_timed_out_request_is_retried_on_its_server_under_one_id_then_raised_not_failed_over(
    max_retries: int,
) -> None:
    a, b = ScriptedServer("a"), ScriptedServer("b")
    remote = fleet_of(a, b, max_retries=max_retries, failover_timeout=2.0)  # bounds the old loop
    try:
        remote.set_vocab_mapping(torch.arange(5), torch.ones(9, dtype=torch.bool))
        a.generate_hangs = b.generate_hangs = True  # whichever server gets it, the request is slow
        with pytest.raises(TargetTimeout) as info:
            remote.generate_batch(*INPUTS)
        assert not isinstance(info.value, NoServerReady)
        attempts = [r for s in (a, b) for r in s.requests if r.url.path == "/generate"]
        assert len(attempts) == 1 + max_retries
        assert len({r.url.host for r in attempts}) == 1  # one server: not failed over
        assert len({r.headers[protocol.REQUEST_ID_HEADER] for r in attempts}) == 1  # joined to the first
        assert all(protocol.FAILOVER_HEADER not in r.headers for r in attempts)
        assert [e["state"] for e in remote.transport_stats()] == ["ready", "ready"]
        assert [e["failovers"] for e in remote.transport_stats()] == [0, 0]
        assert a.sessions == b.sessions == 1
    finally:
        remote.close()


def test_with_the_derived_wait_a_timed_out_request_is_not_sent_again() -> None:
    """The derived wait is the server's own limit plus a margin: past it the server answered
    nothing it should have (200 or its time-limit 503), so a retry would only wait as long again.
    One attempt, one probe: the default wait is one generate_wait(), not 1 + max_retries of them."""
    a = ScriptedServer("a")
    a.request_timeout = 600.0
    remote = fleet_of(a, max_retries=3, failover_timeout=2.0)
    try:
        remote.set_vocab_mapping(torch.arange(5), torch.ones(9, dtype=torch.bool))
        assert remote._servers[0].control.generate_wait() == 630.0
        a.generate_hangs = True
        with pytest.raises(TargetTimeout) as info:
            remote.generate_batch(*INPUTS)
        assert "after 1 attempt(s)" in str(info.value)
        assert a.paths().count("/generate") == 1
    finally:
        remote.close()


def test_a_timed_out_request_whose_server_no_longer_answers_ready_fails_over() -> None:
    a, b = ScriptedServer("a"), ScriptedServer("b")
    remote = fleet_of(a, b)
    try:
        remote.set_vocab_mapping(torch.arange(5), torch.ones(9, dtype=torch.bool))
        a.generate_hangs = a.health_hangs = True  # frozen: neither the request nor the probe is answered
        for _ in range(3):  # whichever server is picked, every batch arrives
            batch = remote.generate_batch(*INPUTS)
            assert torch.equal(batch.target_probs, SUPERVISION["target_probs"])
        assert stats(remote)["a"]["state"] == "out" and "ReadTimeout" in stats(remote)["a"]["reason"]
        assert stats(remote)["b"]["served"] == 3
    finally:
        remote.close()


def test_a_request_that_breaks_two_servers_is_raised() -> None:
    a, b, c = ScriptedServer("a"), ScriptedServer("b"), ScriptedServer("c")
    for s in (a, b, c):
        s.generate_status = 500
    remote = fleet_of(a, b, c)
    try:
        remote.set_vocab_mapping(torch.arange(5), torch.ones(9, dtype=torch.bool))
        with pytest.raises(TargetHTTPError) as info:
            remote.generate_batch(*INPUTS)
        assert info.value.status == 500
        assert sum(p == "/generate" for s in (a, b, c) for p in s.paths()) == 2
    finally:
        remote.close()


def test_servers_that_serve_different_models_are_refused_naming_both() -> None:
    a, b = ScriptedServer("a", "sha256:aaaa"), ScriptedServer("b", "sha256:bbbb")
    remote = fleet_of(a, b)
    try:
        with pytest.raises(ModelMismatch) as info:
            remote.set_vocab_mapping(torch.arange(5), torch.ones(9, dtype=torch.bool))
        assert "http://a:8001" in str(info.value) and "http://b:8001" in str(info.value)
        assert info.value.fingerprints == {"http://a:8001": "sha256:aaaa", "http://b:8001": "sha256:bbbb"}
        with pytest.raises(ModelMismatch):  # and it keeps refusing
            remote.model_info()
    finally:
        remote.close()


def test_a_server_that_comes_back_with_another_model_stays_out() -> None:
    a, b = ScriptedServer("a"), ScriptedServer("b")
    remote = fleet_of(a, b)
    try:
        remote.set_vocab_mapping(torch.arange(5), torch.ones(9, dtype=torch.bool))
        a.up = False
        remote.generate_batch(*INPUTS)
        remote.generate_batch(*INPUTS)
        assert stats(remote)["a"]["state"] == "out"
        a.fingerprint = "sha256:other"
        a.up = True
        wait_until(lambda: "another model" in (stats(remote)["a"]["last_probe"] or ""), timeout=10, what="the check")
        assert stats(remote)["a"]["state"] == "out"
        assert stats(remote)["a"]["readmissions"] == 0
    finally:
        remote.close()


def test_an_upstream_server_is_probed_on_health() -> None:
    def upstream(up: dict[str, bool]):  # type: ignore[no-untyped-def]
        def handle(request: httpx.Request) -> httpx.Response:
            if not up["up"]:
                raise httpx.ConnectError("refused", request=request)
            path = request.url.path.lstrip("/")
            if path == protocol.EP_GENERATE:
                return httpx.Response(200, content=wire.encode(SUPERVISION))
            if path in (protocol.EP_SET_VOCAB_MAPPING, protocol.EP_DISCONNECT, protocol.EP_HEALTH):
                return httpx.Response(200, json={"status": "ok"})
            return httpx.Response(404, text="Not Found")

        return handle

    state = {"up": True}
    seen: list[str] = []
    handler = upstream(state)

    def recording(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        return handler(request)

    b = ScriptedServer("b", fingerprint=None)  # type: ignore[arg-type]
    remote = RemoteEagle3TargetModel.from_urls(["http://up:8001", "http://b:8001"], **FAST)
    remote._servers[0].control = ControlPlane("http://up:8001", max_retries=0, transport=httpx.MockTransport(recording))
    remote._servers[1].control = ControlPlane("http://b:8001", max_retries=0, transport=httpx.MockTransport(b))
    try:
        remote.set_vocab_mapping(torch.arange(5), torch.ones(9, dtype=torch.bool))
        assert remote._servers[0].upstream
        state["up"] = False
        for _ in range(3):
            remote.generate_batch(*INPUTS)
        state["up"] = True
        wait_until(lambda: remote.transport_stats()[0]["state"] == READY, timeout=10, what="re-admission")
        assert "/health/ready" in seen and "/health" in seen  # 404 on the first, then upstream's own
        assert seen.count("/set_vocab_mapping") == 2  # replayed
    finally:
        remote.close()


# -- routing ------------------------------------------------------------------------------


class _Named:
    def __init__(self, url: str) -> None:
        self.url = url
        self.fingerprint = None

    def join(self, *, rejoin: bool, timeout: float | None = None) -> None:
        pass

    def leave(self) -> None:
        pass

    def probe(self, timeout: float) -> str | None:
        return None

    def close(self) -> None:
        pass


def _members(fleet: Fleet, *states: tuple[int, float | None]) -> list[Member]:
    members = fleet.members
    for member, (in_flight, service) in zip(members, states, strict=True):
        member.state, member.in_flight, member.service_s = READY, in_flight, service
        member.last_done = time.monotonic()
    return members


def test_routing_prefers_the_server_expected_to_finish_first() -> None:
    fleet = Fleet([_Named(f"s{i}") for i in range(3)], make_server=_Named, max_in_flight=2)
    now = time.monotonic()
    # Equal servers: the one with fewest in flight.
    m = _members(fleet, (1, 0.1), (0, 0.1), (1, 0.1))
    assert fleet._choose(m, now) is m[1]
    # Equal in flight: the faster one.
    m = _members(fleet, (1, 0.3), (1, 0.1), (1, 0.2))
    assert fleet._choose(m, now) is m[1]
    # A free but much slower server is skipped while a fast one will free a slot sooner...
    m = _members(fleet, (2, 0.05), (0, 1.0), (2, 0.05))
    assert fleet._choose(m, now) is None
    # ...but one only a little slower is used.
    m = _members(fleet, (2, 0.1), (0, 0.15), (2, 0.1))
    assert fleet._choose(m, now) is m[1]
    # Full everywhere: wait.
    m = _members(fleet, (2, 0.1), (2, 0.1), (2, 0.1))
    assert fleet._choose(m, now) is None
    # A server never measured counts as fast as the fastest known one.
    m = _members(fleet, (1, None), (1, 0.5), (1, 0.1))
    assert fleet._choose(m, now) in (m[0], m[2])


def test_an_idle_slow_server_is_tried_again_after_a_while() -> None:
    fleet = Fleet([_Named("slow"), _Named("fast")], make_server=_Named, max_in_flight=2)
    slow, fast = _members(fleet, (0, 1.0), (2, 0.05))
    assert fleet._choose([slow, fast], time.monotonic()) is None
    slow.last_done = time.monotonic() - 10 * IDLE_HALF_LIFE_S  # idle for ten half-lives
    assert fleet._choose([slow, fast], time.monotonic()) is slow


# -- the server list ----------------------------------------------------------------------


def test_server_list_files_are_parsed_and_changes_apply_once_stable(tmp_path: Path) -> None:
    assert parse_server_list("# fleet\nhttp://a:1/\n\nhttp://b:2  # spare\nhttp://a:1\n") == [
        "http://a:1",
        "http://b:2",
    ]
    path = tmp_path / "urls.txt"
    with pytest.raises(ValueError, match="cannot read the server list"):
        ServerList(path)
    path.write_text("\n# nothing yet\n")
    with pytest.raises(ValueError, match="names no server"):
        ServerList(path)
    path.write_text("http://a:1\n")
    listed = ServerList(path)
    assert listed.urls == ["http://a:1"] and listed.poll() is None
    path.write_text("http://a:1\nhttp://b:2\n")
    assert listed.poll() is None  # seen once: not yet stable
    assert listed.poll() == ["http://a:1", "http://b:2"]
    assert listed.poll() is None
    path.unlink()  # being replaced: the current list stays
    assert listed.poll() is None and listed.urls == ["http://a:1", "http://b:2"]


def test_from_urls_takes_a_file_or_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "urls.txt"
    path.write_text("http://a:1\nhttp://b:2\n")
    remote = RemoteEagle3TargetModel.from_urls(str(path))
    assert remote.urls == ["http://a:1", "http://b:2"] and remote.num_remote_servers == 2
    monkeypatch.setenv("EAGLE3_SERVER_LIST", str(path))
    assert RemoteEagle3TargetModel.from_urls([]).urls == ["http://a:1", "http://b:2"]
    assert RemoteEagle3TargetModel.from_urls(["http://c:3"]).urls == ["http://c:3"]  # given URLs win
    monkeypatch.delenv("EAGLE3_SERVER_LIST")
    with pytest.raises(ValueError, match="at least one server URL"):
        RemoteEagle3TargetModel.from_urls([])


def test_servers_join_and_drain_when_the_list_changes(tmp_path: Path) -> None:
    path = tmp_path / "urls.txt"
    path.write_text("http://a:8001\n")
    scripted = {"a": ScriptedServer("a"), "b": ScriptedServer("b")}
    remote = RemoteEagle3TargetModel.from_urls(str(path), **FAST)
    make = remote._new_server

    def new_server(url: str):  # type: ignore[no-untyped-def]
        server = make(url)
        name = url.split("//")[1].split(":")[0]
        server.control = ControlPlane(url, max_retries=0, transport=httpx.MockTransport(scripted[name]))
        return server

    remote._fleet._make_server = new_server
    remote._servers[0].control = ControlPlane(
        "http://a:8001", max_retries=0, transport=httpx.MockTransport(scripted["a"])
    )
    try:
        remote.set_vocab_mapping(torch.arange(5), torch.ones(9, dtype=torch.bool))
        path.write_text("http://a:8001\nhttp://b:8001\n")
        wait_until(lambda: [e["state"] for e in remote.transport_stats()] == [READY, READY], timeout=10, what="join")
        assert scripted["b"].mapping_version() == "1"  # the new server got the current mapping
        path.write_text("http://b:8001\n")
        wait_until(lambda: remote.urls == ["http://b:8001"], timeout=10, what="drain")
        wait_until(lambda: "/disconnect" in scripted["a"].paths(), timeout=10, what="a's goodbye")
        before = scripted["a"].paths().count("/generate")
        for _ in range(3):
            remote.generate_batch(*INPUTS)
        assert scripted["a"].paths().count("/generate") == before
        assert remote.num_remote_servers == 1
    finally:
        remote.close()
