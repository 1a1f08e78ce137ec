"""In-process tests of the operations modules: NVML readings against the fake ``pynvml``, admission,
session leases, auth, and the client's Retry-After handling and heartbeat."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from types import ModuleType

import httpx
import pytest
from prometheus_client import CollectorRegistry
from typer.testing import CliRunner

from eagle3_appliance.core.admission import Admission, Ticket
from eagle3_appliance.core.sessions import ANONYMOUS, SessionRegistry
from eagle3_appliance.errors import Unauthorized, Unavailable
from eagle3_appliance.ops import gpu
from eagle3_appliance.ops.auth import BearerAuth
from eagle3_appliance.ops.metrics import GpuCollector
from eagle3_client import TargetOverloaded, protocol
from eagle3_client.auth import auth_headers
from eagle3_client.transports.control import ControlPlane
from eagle3_client.transports.heartbeat import Heartbeat
from tests.ops_support import healthy_gpus, install_fake_nvml, wait_until

# -- NVML through the fake pynvml --------------------------------------------------------


@pytest.fixture
def nvml(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """A fresh fake ``pynvml``, installed as ``sys.modules["pynvml"]``."""
    module = install_fake_nvml(monkeypatch, {"driver_version": "550.54.15", "gpus": healthy_gpus()})
    return module


def test_healthy_gpus_are_read_in_units_with_no_fatal_reason(nvml: ModuleType) -> None:
    report = gpu.read_report()
    assert report.nvml and report.error is None and report.driver_version == "550.54.15"
    g0, g1 = report.gpus
    assert (g0.index, g0.name, g0.uuid) == (0, "NVIDIA H100 80GB HBM3", healthy_gpus()[0]["uuid"])
    assert (g0.memory_used_bytes, g0.memory_total_bytes) == (10 * 1024**3, 80 * 1024**3)
    assert (g0.utilization_gpu_percent, g0.utilization_memory_percent, g0.temperature_c) == (37, 12, 41)
    assert (g0.power_draw_w, g0.power_limit_w) == (123.456, 700.0)
    assert g0.clocks_event_reasons == [] and g1.clocks_event_reasons == ["gpu_idle"]
    assert (g0.ecc_uncorrected_volatile, g0.remapped_rows_pending, g0.remapped_rows_failure) == (0, False, False)
    assert g0.unsupported == [] and g0.errors == {} and report.fatal_reasons() == []


def test_unsupported_readings_are_reported_as_unsupported_not_errors(nvml: ModuleType) -> None:
    gpus = healthy_gpus()
    gpus[0]["unsupported"] = ["power_draw", "power_limit", "ecc", "remapped_rows", "clocks", "temperature"]
    nvml.configure({"gpus": gpus})
    g0 = gpu.read_report().gpus[0]
    assert sorted(g0.unsupported) == [
        "clocks_event_reasons",
        "ecc_uncorrected_volatile",
        "power_draw",
        "power_limit",
        "remapped_rows",
        "temperature",
    ]
    assert g0.errors == {}
    assert (g0.power_draw_w, g0.temperature_c, g0.ecc_uncorrected_volatile, g0.remapped_rows_failure) == (None,) * 4
    assert g0.fatal_reasons() == []
    table = gpu.format_table(gpu.read_report())
    assert "n/a / n/a W" in table and "err" not in table.split("\n")[2]


def test_a_lost_gpu_is_an_error_and_fatal(nvml: ModuleType) -> None:
    gpus = healthy_gpus()
    gpus[1]["lost"] = True
    nvml.configure({"gpus": gpus})
    report = gpu.read_report()
    g1 = report.gpus[1]
    assert g1.lost and g1.errors["memory"] == "GPU is lost" and g1.unsupported == []
    assert report.fatal_reasons() == [f"gpu 1 ({gpus[1]['uuid']}): GPU is lost (NVML_ERROR_GPU_IS_LOST)"]


def test_ecc_errors_and_remap_failure_are_fatal_but_pending_remaps_and_throttling_are_not(nvml: ModuleType) -> None:
    gpus = healthy_gpus()
    gpus[0].update(ecc_uncorrected_volatile=3, clocks_event_reasons=0x8 | 0x20 | 0x400)
    gpus[1].update(remapped_rows=[0, 2, 1, 1])
    nvml.configure({"gpus": gpus})
    report = gpu.read_report()
    g0, g1 = report.gpus
    assert g0.clocks_event_reasons == ["hw_slowdown", "sw_thermal_slowdown", "unknown_0x400"]
    assert g0.fatal_reasons() == ["3 volatile uncorrected ECC error(s)"]
    assert g1.fatal_reasons() == ["row-remap failure"]
    gpus[1].update(remapped_rows=[0, 2, 1, 0])
    nvml.configure({"gpus": gpus[1:]})
    assert gpu.read_report().fatal_reasons() == []


def test_xid_events_arrive_through_the_event_set_and_only_fatal_ones_count(nvml: ModuleType) -> None:
    monitor = gpu.GpuMonitor(poll_interval=60).start()  # only events refresh the snapshot here
    try:
        assert monitor.snapshot.fatal_reasons() == []
        assert all(g.xid_watch for g in monitor.snapshot.gpus)
        nvml._state["xid_events"] = [{"gpu": 1, "xid": 13}, {"gpu": 0, "xid": 79}]
        wait_until(lambda: len(monitor.xid_events()) == 2, timeout=10, what="two XID events")
        snapshot = wait_until(lambda: monitor.snapshot.fatal_reasons() and monitor.snapshot, timeout=10)
    finally:
        monitor.stop()
    uuid0 = healthy_gpus()[0]["uuid"]
    assert [(e.gpu, e.xid, e.fatal) for e in monitor.xid_events()] == [(1, 13, False), (0, 79, True)]
    assert snapshot.fatal_reasons() == [f"gpu 0 ({uuid0}): xid 79 (GPU has fallen off the bus)"]
    assert "event_set_create" in nvml.calls


def test_xid_events_kept_are_bounded_while_fatal_ones_and_counts_survive(nvml: ModuleType) -> None:
    """A GPU flooding XIDs (an application error loop) must not grow the server's memory."""
    flood = 3 * gpu.MAX_XID_EVENTS
    monitor = gpu.GpuMonitor(poll_interval=60).start()
    try:
        nvml._state["xid_events"] = [{"gpu": 0, "xid": 79}] + [{"gpu": 0, "xid": 13}] * flood
        wait_until(lambda: monitor.read().gpus[0].xid_counts.get(13) == flood, timeout=30, what="the flood")
        report = monitor.read()
    finally:
        monitor.stop()
    g0 = report.gpus[0]
    assert g0.xid_counts == {79: 1, 13: flood}
    assert len(g0.xid_events) == gpu.MAX_XID_EVENTS + 1  # the latest, plus the first fatal one
    assert (g0.xid_events[0].xid, g0.xid_events[-1].xid) == (79, 13)
    assert report.fatal_reasons() == [f"gpu 0 ({healthy_gpus()[0]['uuid']}): xid 79 (GPU has fallen off the bus)"]
    assert len(monitor.xid_events()) == gpu.MAX_XID_EVENTS + 1
    data = json.loads(json.dumps(report.to_json()))
    assert data["gpus"][0]["xid_counts"] == {"13": flood, "79": 1}
    assert gpu.report_from_json(data).to_json() == report.to_json()
    assert f"79,13x{flood}" in gpu.format_table(report)
    registry = CollectorRegistry()
    registry.register(GpuCollector(monitor))  # the /metrics counter counts every event, kept or not
    assert registry.get_sample_value("eagle3_gpu_xid_errors_total", {**_gpu0_labels(g0), "xid": "13"}) == flood


def _gpu0_labels(g: gpu.GpuReading) -> dict[str, str]:
    return {"gpu": str(g.index), "UUID": g.uuid or "", "modelName": g.name or ""}


def test_gpus_without_event_support_are_polled_and_say_so(nvml: ModuleType) -> None:
    gpus = healthy_gpus()
    gpus[1]["unsupported"] = ["events"]
    nvml.configure({"gpus": gpus})
    with gpu.GpuMonitor(poll_interval=60) as monitor:
        g0, g1 = monitor.read().gpus
    assert g0.xid_watch and not g1.xid_watch
    assert g1.unsupported == ["xid_events"] and g1.errors == {}


@pytest.mark.parametrize(
    ("visible", "expected"),
    [
        ("1", [1]),
        ("1,0", [1, 0]),
        ("GPU-6666", [1]),
        ("0,7,1", [0]),  # like CUDA, the list ends at the first entry naming no device
        ("", []),
    ],
)
def test_cuda_visible_devices_selects_the_gpus(
    nvml: ModuleType, monkeypatch: pytest.MonkeyPatch, visible: str, expected: list[int]
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert [g.index for g in gpu.read_report().gpus] == expected


def test_without_nvml_the_report_says_why(nvml: ModuleType) -> None:
    nvml.configure({"init_error": 12, "gpus": []})
    report = gpu.read_report()
    assert not report.nvml and report.gpus == []
    assert report.error == "NVML unavailable: NVML Shared Library Not Found"
    assert gpu.format_table(report) == "no GPU readings: NVML unavailable: NVML Shared Library Not Found"


def test_report_json_round_trips_for_the_table(nvml: ModuleType) -> None:
    monitor = gpu.GpuMonitor(poll_interval=60).start()
    try:
        nvml._state["xid_events"] = [{"gpu": 0, "xid": 48}]
        wait_until(lambda: monitor.xid_events(), timeout=10)
        report = monitor.read()
    finally:
        monitor.stop()
    data = json.loads(json.dumps(report.to_json()))
    again = gpu.report_from_json(data)
    assert again.to_json() == report.to_json()
    assert gpu.format_table(again) == gpu.format_table(report)
    assert "FATAL: xid 48 (double-bit ECC error)" in gpu.format_table(again)


def test_gpus_command_prints_the_table_and_fails_on_a_fatal_gpu(nvml: ModuleType) -> None:
    from eagle3_appliance.cli import app

    runner = CliRunner()
    done = runner.invoke(app, ["gpus"])
    assert done.exit_code == 0, done.output
    lines = done.output.splitlines()
    assert lines[0] == "NVML driver 550.54.15, 2 visible GPU(s)"
    assert lines[1].split()[:4] == ["GPU", "NAME", "UUID", "MEMORY"]
    row0 = lines[2]
    for cell in ("NVIDIA H100 80GB HBM3", "10.0/80.0 GiB", "37%", "41C", "123 / 700 W", "none", "ok"):
        assert cell in row0, (cell, row0)
    gpus = healthy_gpus()
    gpus[0]["ecc_uncorrected_volatile"] = 1
    nvml.configure({"gpus": gpus})
    done = runner.invoke(app, ["gpus", "--json"])
    assert done.exit_code == 1
    assert json.loads(done.output)["fatal"] == [f"gpu 0 ({gpus[0]['uuid']}): 1 volatile uncorrected ECC error(s)"]


# -- admission -------------------------------------------------------------------------


def _run(coro):  # noqa: ANN001, ANN202 - tiny helper
    return asyncio.new_event_loop().run_until_complete(coro)


def _compute(ticket: Ticket, work: Callable[[], object]) -> None:
    """What the pipeline does with a ticket on the model thread."""
    ticket.begin_compute()
    try:
        work()
        ticket.forward_done()
    finally:
        ticket.end_compute()


def test_admission_lets_max_queue_wait_behind_the_computing_request() -> None:
    async def scenario() -> list[str]:
        admission = Admission(max_queue=1)
        events: list[str] = []
        gate = threading.Event()
        loop = asyncio.get_running_loop()

        async def request(name: str) -> None:
            try:
                async with admission.admit() as ticket:
                    events.append(f"{name} admitted")
                    await loop.run_in_executor(None, _compute, ticket, lambda: gate.wait(5))
            except Unavailable as exc:
                events.append(f"{name} refused retry-after={exc.headers['Retry-After']}")

        first = asyncio.ensure_future(request("a"))
        await asyncio.sleep(0.05)
        assert (admission.computing, admission.queued) == (1, 0)
        second = asyncio.ensure_future(request("b"))  # may wait: one computing, none queued
        await asyncio.sleep(0.01)
        await request("c")  # one computing and one queued: full
        gate.set()
        await asyncio.gather(first, second)
        assert (admission.computing, admission.queued, admission.inflight, admission.refused) == (0, 0, 0, 1)
        return events

    events = _run(scenario())
    assert events[:3] == ["a admitted", "b admitted", "c refused retry-after=2"]  # 2 ahead x 1 s


def test_admission_releases_a_request_that_never_reached_the_model() -> None:
    async def scenario() -> Admission:
        admission = Admission(max_queue=0)
        with pytest.raises(asyncio.TimeoutError):
            async with admission.admit():
                await asyncio.wait_for(asyncio.sleep(10), timeout=0.01)
        return admission

    admission = _run(scenario())
    assert (admission.queued, admission.inflight, admission.computing) == (0, 0, 0) and admission.idle()


def test_ticket_phases_split_queue_forward_encode_send() -> None:
    admission = Admission(max_queue=4)

    async def scenario() -> dict[str, float]:
        async with admission.admit() as ticket:
            await asyncio.sleep(0.02)
            ticket.begin_compute()
            time.sleep(0.03)
            ticket.forward_done()
            ticket.end_compute()
            ticket.encoded()
            ticket.sent(123)
        return ticket.phases()

    phases = _run(scenario())
    assert list(phases) == ["queue", "forward", "encode", "send"]
    assert phases["queue"] >= 0.02 and phases["forward"] >= 0.03 and all(v >= 0 for v in phases.values())


# -- sessions and leases ---------------------------------------------------------------


class Closable:
    def __init__(self) -> None:
        self.closed = 0

    def close(self) -> None:
        self.closed += 1


def test_expire_drops_only_silent_idle_sessions_and_closes_their_resources() -> None:
    registry = SessionRegistry()
    dropped: list[tuple[str, str]] = []
    registry.on_drop.append(lambda s, reason: (dropped.append((s.id, reason)), s.close()))
    silent, busy, fresh = registry.register("a"), registry.register("b"), registry.register("c")
    plane = Closable()
    silent.extras["data_plane"] = plane
    silent.extras["note"] = "no close method"
    now = time.monotonic()
    silent.last_seen = busy.last_seen = now - 100
    registry.get(ANONYMOUS).last_seen = now - 10_000
    expired = registry.expire(60, busy={busy.id}, now=now)
    assert [s.id for s in expired] == [silent.id]
    assert dropped == [(silent.id, "expired")] and plane.closed == 1
    assert {s.id for s in registry.registered()} == {busy.id, fresh.id}
    registry.get(None)  # the anonymous session never expires
    assert registry.drop(fresh.id) is fresh and dropped[-1] == (fresh.id, "disconnect")
    assert registry.drop(ANONYMOUS) is None


def test_closing_a_session_survives_a_failing_extra() -> None:
    registry = SessionRegistry()
    session = registry.register()

    class Broken:
        def close(self) -> None:
            raise RuntimeError("boom")

    good = Closable()
    session.extras.update(a=Broken(), b=good)
    session.close()
    assert good.closed == 1


# -- auth --------------------------------------------------------------------------------


@pytest.mark.parametrize("header", [None, "", "Bearer nope", "bearer abc12", "Basic abc123", "abc123"])
def test_bearer_check_refuses(header: str | None) -> None:
    with pytest.raises(Unauthorized) as err:
        BearerAuth("abc123").check(header)
    assert err.value.status_code == 401 and err.value.headers["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.parametrize("header", ["Bearer abc123", "bearer abc123", "BEARER  abc123 "])
def test_bearer_check_accepts(header: str) -> None:
    BearerAuth("abc123").check(header)  # raises on refusal


# -- the client: Retry-After and heartbeats ----------------------------------------------


def _control(handler, sleeps: list[float], monkeypatch: pytest.MonkeyPatch, **kw) -> ControlPlane:  # noqa: ANN001
    monkeypatch.setattr("eagle3_client.transports.control.time.sleep", sleeps.append)
    return ControlPlane("http://server:8001", transport=httpx.MockTransport(handler), **kw)


@pytest.mark.parametrize(
    ("retry_after", "expected_sleep"),
    [("2", 2.0), ("0.5", 0.5), ("3600", 30.0), (None, 0.25), ("Wed, 21 Oct 2015 07:28:00 GMT", 0.25)],
)
def test_control_plane_waits_as_long_as_retry_after_says(
    monkeypatch: pytest.MonkeyPatch, retry_after: str | None, expected_sleep: float
) -> None:
    answers = iter([503, 200])
    sleeps: list[float] = []

    def handler(request: httpx.Request) -> httpx.Response:
        status = next(answers)
        headers = {"Retry-After": retry_after} if status == 503 and retry_after is not None else {}
        body = {"error": "busy"} if status == 503 else {"ok": 1}
        return httpx.Response(status, json=body, headers=headers)

    control = _control(handler, sleeps, monkeypatch, backoff=0.25)
    assert control.post_json("model_info") == {"ok": 1}
    assert sleeps == [expected_sleep]


def test_control_plane_gives_up_after_max_retries_of_503(monkeypatch: pytest.MonkeyPatch) -> None:
    sleeps: list[float] = []
    control = _control(
        lambda r: httpx.Response(503, json={"error": "busy"}, headers={"Retry-After": "1"}),
        sleeps,
        monkeypatch,
        max_retries=2,
    )
    with pytest.raises(TargetOverloaded) as err:
        control.post_json("generate")
    assert err.value.status == 503 and err.value.server_message == "busy" and sleeps == [1.0, 1.0]


def test_heartbeat_beats_with_session_and_token_and_stops_on_410() -> None:
    seen: list[tuple[str, str | None, str | None]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(
            (request.url.path, request.headers.get(protocol.SESSION_HEADER), request.headers.get("authorization"))
        )
        return httpx.Response(410 if len(seen) >= 3 else 200, json={"status": "ok"})

    control = ControlPlane("http://server:8001", transport=httpx.MockTransport(handler), headers=auth_headers("tk"))
    beat = Heartbeat(control, "abcdef0123456789", interval=0.01).start()
    wait_until(lambda: not beat.alive, timeout=10, what="the heartbeat to stop on 410")
    assert beat.beats == 2
    assert seen == [("/heartbeat", "abcdef0123456789", "Bearer tk")] * 3


# -- lifecycle decisions -------------------------------------------------------------------


class _StopRecorder:
    """Stands in for the Sanic app: Lifecycle only calls ``stop`` and sets ``config``."""

    def __init__(self) -> None:
        self.stops: list[bool] = []
        self.config = type("Config", (), {})()

    def stop(self, terminate: bool = True) -> None:
        self.stops.append(terminate)


def _lifecycle(exit_when_idle: bool):  # noqa: ANN202
    from eagle3_appliance.ops.inflight import InFlight
    from eagle3_appliance.ops.lifecycle import Lifecycle
    from eagle3_appliance.settings import Settings

    app = _StopRecorder()
    registry = SessionRegistry()
    life = Lifecycle(app, Settings(exit_when_idle=exit_when_idle), registry, InFlight(), Admission(4))  # type: ignore[arg-type]
    return app, registry, life


@pytest.mark.parametrize("exit_when_idle", [True, False])
def test_exit_when_idle_only_when_asked_and_only_after_the_last_session(exit_when_idle: bool) -> None:
    async def scenario() -> list[bool]:
        app, registry, life = _lifecycle(exit_when_idle)
        a, b = registry.register(), registry.register()
        life.session_registered()
        registry.drop(a.id)
        await asyncio.sleep(0.1)
        assert app.stops == []  # b is still there
        registry.drop(b.id, reason="expired")
        await asyncio.sleep(0.1)
        return app.stops

    assert _run(scenario()) == ([False] if exit_when_idle else [])


def test_exit_when_idle_follows_an_upstream_clients_disconnect() -> None:
    async def scenario() -> list[bool]:
        app, _registry, life = _lifecycle(True)
        life.upstream_disconnected()
        await asyncio.sleep(0.1)
        return app.stops

    assert _run(scenario()) == [False]


def test_drain_releases_every_session_and_records_a_clean_exit() -> None:
    async def scenario() -> tuple[int, int, list[str]]:
        _app, registry, life = _lifecycle(False)
        planes = [Closable(), Closable()]
        reasons: list[str] = []
        registry.on_drop.append(lambda s, reason: reasons.append(reason))
        for plane in planes:
            registry.register().extras["data_plane"] = plane
        await life.drain()
        return sum(p.closed for p in planes), life.exit_code(), reasons

    closed, code, reasons = _run(scenario())
    assert (closed, code, reasons) == (2, 0, ["shutdown", "shutdown"])


def test_an_xid_from_a_gpu_too_lost_to_name_itself_is_still_attributed(nvml: ModuleType) -> None:
    gpus = healthy_gpus()
    nvml.configure({"gpus": gpus})
    monitor = gpu.GpuMonitor(poll_interval=60).start()
    try:
        gpus[1].update(lost=True, lost_uuid=True)  # after XID 79 not even the UUID is readable
        nvml._state["gpus"] = gpus
        nvml._state["xid_events"] = [{"gpu": 1, "xid": 79}]
        snapshot = wait_until(lambda: monitor.snapshot.fatal_reasons() and monitor.snapshot, timeout=10)
    finally:
        monitor.stop()
    assert [(e.gpu, e.uuid, e.xid) for e in monitor.xid_events()] == [(1, gpus[1]["uuid"], 79)]
    assert snapshot.fatal_reasons() == [
        f"gpu 1 ({gpus[1]['uuid']}): GPU is lost (NVML_ERROR_GPU_IS_LOST)",
        f"gpu 1 ({gpus[1]['uuid']}): xid 79 (GPU has fallen off the bus)",
    ]
    assert snapshot.unattributed_xid_events == []
