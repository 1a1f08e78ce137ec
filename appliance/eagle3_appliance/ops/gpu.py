"""GPU health through NVML: readings per visible GPU, XID events, and what counts as fatal.

Every NVML call goes through the ``pynvml`` module (nvidia-ml-py), imported lazily, so the
appliance runs on machines without a driver (it then reports ``nvml: false`` and why) and
tests can put a fake ``pynvml`` at exactly this boundary. A reading a GPU does not support
(``NVML_ERROR_NOT_SUPPORTED``, or a function the driver lacks) is listed under
``unsupported`` with the value ``None``; only other failures land in ``errors``.

:class:`GpuMonitor` owns one background thread: it waits on an NVML event set for XID
events (``nvmlEventTypeXidCriticalError`` delivers every XID, whatever its name says) and
refreshes a cached :class:`GpuReport` every ``poll_interval`` seconds. Probes read only the
cache, so they never wait on the driver.

Usage::

    with GpuMonitor(poll_interval=5.0) as monitor:
        print(format_table(monitor.read()))
        if monitor.snapshot.fatal_reasons(): ...
"""

from __future__ import annotations

import ctypes
import importlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from types import ModuleType
from typing import Any, TypeVar

from eagle3_client.transports.gpu_identity import uuid_or_empty as _uuid_or_empty
from eagle3_client.transports.gpu_identity import visible_handles as _visible_handles

__all__ = [
    "CLOCKS_EVENT_REASONS",
    "FATAL_XIDS",
    "GpuMonitor",
    "GpuReading",
    "GpuReport",
    "MAX_XID_EVENTS",
    "XidEvent",
    "XidLog",
    "decode_clocks_event_reasons",
    "format_table",
    "read_report",
    "report_from_json",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

# XID events kept per GPU besides the first of each fatal XID (every event is still counted):
# a GPU in an application-error loop reports XIDs for as long as the server runs.
MAX_XID_EVENTS = 64

# XIDs after which this GPU cannot be trusted until it is reset or the node rebooted
# (NVIDIA's Xid catalog: immediate action "reset GPU" / "reboot", or a hardware fault).
# XIDs caused by an application (13, 31, 43, 45, ...) and recoverable ones (63, 94) are
# recorded and exported but do not make the server unready.
FATAL_XIDS: dict[int, str] = {
    48: "double-bit ECC error",
    62: "internal micro-controller halt",
    64: "ECC page retirement or row-remapper recording failure",
    74: "NVLink error",
    79: "GPU has fallen off the bus",
    95: "uncontained ECC error",
    119: "GSP RPC timeout",
    120: "GSP error",
    140: "unrecovered ECC error",
}

# NVML's clocks-event (formerly "throttle") reason bits, stable across driver versions.
CLOCKS_EVENT_REASONS: tuple[tuple[int, str], ...] = (
    (0x1, "gpu_idle"),
    (0x2, "applications_clocks_setting"),
    (0x4, "sw_power_cap"),
    (0x8, "hw_slowdown"),
    (0x10, "sync_boost"),
    (0x20, "sw_thermal_slowdown"),
    (0x40, "hw_thermal_slowdown"),
    (0x80, "hw_power_brake_slowdown"),
    (0x100, "display_clock_setting"),
)

# NVML return codes that mean "this GPU or driver does not offer that reading".
_NOT_SUPPORTED_CODES = (3, 13)  # NVML_ERROR_NOT_SUPPORTED, NVML_ERROR_FUNCTION_NOT_FOUND
_GPU_IS_LOST = 15
_TIMEOUT = 10
_XID_EVENT_TYPE = 0x8  # nvmlEventTypeXidCriticalError


def decode_clocks_event_reasons(mask: int) -> list[str]:
    """Bit mask -> reason names; bits this table does not know come out as ``unknown_0x...``."""
    names = [name for bit, name in CLOCKS_EVENT_REASONS if mask & bit]
    known = 0
    for bit, _ in CLOCKS_EVENT_REASONS:
        known |= bit
    rest = mask & ~known
    bit = 1
    while rest:
        if rest & bit:
            names.append(f"unknown_{bit:#x}")
            rest &= ~bit
        bit <<= 1
    return names


@dataclass(frozen=True)
class XidEvent:
    """One XID the driver reported for a watched GPU since the server started."""

    gpu: int
    uuid: str
    xid: int
    time: float  # Unix time the event was received

    @property
    def fatal(self) -> bool:
        return self.xid in FATAL_XIDS

    def describe(self) -> str:
        what = FATAL_XIDS.get(self.xid)
        return f"xid {self.xid}" + (f" ({what})" if what else "")


class XidLog:
    """One GPU's XID events, bounded: the first event of each fatal XID (readiness depends on
    it), the :data:`MAX_XID_EVENTS` latest events, and a count of every XID ever seen."""

    def __init__(self) -> None:
        self.first_fatal: dict[int, XidEvent] = {}
        self.recent: deque[XidEvent] = deque(maxlen=MAX_XID_EVENTS)
        self.counts: dict[int, int] = {}

    def add(self, event: XidEvent) -> None:
        if event.fatal:
            self.first_fatal.setdefault(event.xid, event)
        self.recent.append(event)
        self.counts[event.xid] = self.counts.get(event.xid, 0) + 1

    def events(self) -> list[XidEvent]:
        """The kept events in arrival order."""
        older = [e for e in self.first_fatal.values() if not any(e is r for r in self.recent)]
        return older + list(self.recent)


@dataclass
class GpuReading:
    """One GPU's readings; ``None`` where the GPU does not support a reading or it failed."""

    index: int
    uuid: str | None = None
    name: str | None = None
    memory_used_bytes: int | None = None
    memory_total_bytes: int | None = None
    utilization_gpu_percent: int | None = None
    utilization_memory_percent: int | None = None
    temperature_c: int | None = None
    power_draw_w: float | None = None
    power_limit_w: float | None = None
    clocks_event_reasons_mask: int | None = None
    ecc_uncorrected_volatile: int | None = None
    remapped_rows_pending: bool | None = None
    remapped_rows_failure: bool | None = None
    lost: bool = False  # NVML answered "GPU is lost" (typically after XID 79)
    xid_watch: bool = False  # XID events are being watched for this GPU
    xid_events: list[XidEvent] = field(default_factory=list)  # kept ones (see XidLog)
    xid_counts: dict[int, int] = field(default_factory=dict)  # every XID seen, by number
    unsupported: list[str] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)

    @property
    def clocks_event_reasons(self) -> list[str] | None:
        mask = self.clocks_event_reasons_mask
        return None if mask is None else decode_clocks_event_reasons(mask)

    def fatal_reasons(self) -> list[str]:
        """Why this GPU cannot serve: lost, fatal XID, uncorrected ECC errors, row-remap failure."""
        reasons = []
        if self.lost:
            reasons.append("GPU is lost (NVML_ERROR_GPU_IS_LOST)")
        reasons += [event.describe() for event in self.xid_events if event.fatal]
        if self.ecc_uncorrected_volatile:
            reasons.append(f"{self.ecc_uncorrected_volatile} volatile uncorrected ECC error(s)")
        if self.remapped_rows_failure:
            reasons.append("row-remap failure")
        return reasons

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["xid_events"] = [{**asdict(e), "fatal": e.fatal} for e in self.xid_events]
        out["xid_counts"] = {str(xid): n for xid, n in sorted(self.xid_counts.items())}
        out["clocks_event_reasons"] = self.clocks_event_reasons
        out["fatal"] = self.fatal_reasons()
        return out


@dataclass
class GpuReport:
    """All visible GPUs, or why there are none to report."""

    nvml: bool
    error: str | None = None
    driver_version: str | None = None
    gpus: list[GpuReading] = field(default_factory=list)
    # XIDs from a watched device that could not be told apart any more (e.g. lost from the bus).
    unattributed_xid_events: list[XidEvent] = field(default_factory=list)
    time: float = field(default_factory=time.time)

    def fatal_reasons(self) -> list[str]:
        reasons = [f"gpu {g.index} ({g.uuid}): {reason}" for g in self.gpus for reason in g.fatal_reasons()]
        reasons += [f"unidentified gpu: {e.describe()}" for e in self.unattributed_xid_events if e.fatal]
        return reasons

    def to_json(self) -> dict[str, Any]:
        return {
            "nvml": self.nvml,
            "error": self.error,
            "driver_version": self.driver_version,
            "time": self.time,
            "gpus": [g.to_json() for g in self.gpus],
            "unattributed_xid_events": [{**asdict(e), "fatal": e.fatal} for e in self.unattributed_xid_events],
            "fatal": self.fatal_reasons(),
        }


def report_from_json(data: dict[str, Any]) -> GpuReport:
    """The inverse of :meth:`GpuReport.to_json` (``eagle3-appliance gpus --url`` prints a server's report)."""
    names = {f for f in GpuReading.__dataclass_fields__}

    def events(items: list[dict[str, Any]]) -> list[XidEvent]:
        return [XidEvent(gpu=e["gpu"], uuid=e["uuid"], xid=e["xid"], time=e["time"]) for e in items]

    gpus = []
    for item in data.get("gpus", []):
        fields = {k: v for k, v in item.items() if k in names and k not in ("xid_events", "xid_counts")}
        counts = {int(xid): int(n) for xid, n in item.get("xid_counts", {}).items()}
        gpus.append(GpuReading(**fields, xid_events=events(item.get("xid_events", [])), xid_counts=counts))
    return GpuReport(
        nvml=bool(data.get("nvml")),
        error=data.get("error"),
        driver_version=data.get("driver_version"),
        gpus=gpus,
        unattributed_xid_events=events(data.get("unattributed_xid_events", [])),
        time=float(data.get("time", time.time())),
    )


def _import_nvml() -> ModuleType:
    return importlib.import_module("pynvml")


def _code(exc: BaseException) -> int | None:
    value = getattr(exc, "value", None)
    return value if isinstance(value, int) else None


class _Reader:
    """Fills one GpuReading, sorting each failed call into unsupported / lost / error."""

    def __init__(self, nvml: ModuleType, reading: GpuReading) -> None:
        self.nvml = nvml
        self.reading = reading

    def call(self, name: str, fn: Callable[[], T]) -> T | None:
        try:
            return fn()
        except AttributeError:  # this nvidia-ml-py has no such function: the driver API predates it
            self.reading.unsupported.append(name)
        except self.nvml.NVMLError as exc:
            code = _code(exc)
            if code in _NOT_SUPPORTED_CODES:
                self.reading.unsupported.append(name)
            else:
                if code == _GPU_IS_LOST:
                    self.reading.lost = True
                self.reading.errors[name] = str(exc) or type(exc).__name__
        return None


def _read_gpu(nvml: ModuleType, index: int, handle: Any) -> GpuReading:
    reading = GpuReading(index=index)
    r = _Reader(nvml, reading)
    reading.name = r.call("name", lambda: _text(nvml.nvmlDeviceGetName(handle)))
    reading.uuid = r.call("uuid", lambda: _text(nvml.nvmlDeviceGetUUID(handle)))
    memory = r.call("memory", lambda: nvml.nvmlDeviceGetMemoryInfo(handle))
    if memory is not None:
        reading.memory_used_bytes, reading.memory_total_bytes = int(memory.used), int(memory.total)
    util = r.call("utilization", lambda: nvml.nvmlDeviceGetUtilizationRates(handle))
    if util is not None:
        reading.utilization_gpu_percent, reading.utilization_memory_percent = int(util.gpu), int(util.memory)
    reading.temperature_c = r.call(
        "temperature", lambda: int(nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU))
    )
    reading.power_draw_w = r.call("power_draw", lambda: nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0)
    reading.power_limit_w = r.call("power_limit", lambda: nvml.nvmlDeviceGetEnforcedPowerLimit(handle) / 1000.0)
    reading.clocks_event_reasons_mask = r.call("clocks_event_reasons", lambda: int(_clocks_event_reasons(nvml, handle)))
    reading.ecc_uncorrected_volatile = r.call(
        "ecc_uncorrected_volatile",
        lambda: int(
            nvml.nvmlDeviceGetTotalEccErrors(handle, nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, nvml.NVML_VOLATILE_ECC)
        ),
    )
    rows = r.call("remapped_rows", lambda: nvml.nvmlDeviceGetRemappedRows(handle))
    if rows is not None:
        _corrected, _uncorrected, pending, failure = rows
        reading.remapped_rows_pending, reading.remapped_rows_failure = bool(pending), bool(failure)
    return reading


def _clocks_event_reasons(nvml: ModuleType, handle: Any) -> int:
    # Renamed from "throttle reasons" in newer drivers; same bits.
    fn = getattr(nvml, "nvmlDeviceGetCurrentClocksEventReasons", None)
    if fn is None:
        fn = nvml.nvmlDeviceGetCurrentClocksThrottleReasons
    return int(fn(handle))


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _handle_key(handle: Any) -> Any:
    """Something equal for two handles of one device: the pointer value for pynvml's ctypes handles."""
    try:
        return ctypes.cast(handle, ctypes.c_void_p).value
    except (TypeError, ctypes.ArgumentError):
        return handle


def read_report(nvml: ModuleType | None = None) -> GpuReport:
    """One fresh reading of every visible GPU; initialises and shuts down NVML itself.

    This is what ``eagle3-appliance gpus`` prints; a running server uses :class:`GpuMonitor`.
    """
    with GpuMonitor(watch_events=False, nvml=nvml) as monitor:
        return monitor.read()


class GpuMonitor:
    """NVML for one process: fresh readings, a cached snapshot, and a background XID watcher.

    ``start()`` never raises: without NVML the monitor reports ``nvml: false`` with the reason.
    """

    def __init__(
        self, poll_interval: float = 5.0, *, watch_events: bool = True, nvml: ModuleType | None = None
    ) -> None:
        self.poll_interval = poll_interval
        self.watch_events = watch_events
        self._nvml = nvml
        self._handles: list[tuple[int, Any]] = []
        self._error: str | None = "NVML not started"
        self._driver: str | None = None
        self._lock = threading.Lock()
        self._xids: dict[int, XidLog] = {}  # by GPU index; -1: a device that could not be identified
        self._watched: set[int] = set()
        self._uuids: dict[int, str] = {}
        self._keys: dict[int, Any] = {}
        self._initialized = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._event_set: Any = None
        self.snapshot = GpuReport(nvml=False, error=self._error)

    @property
    def available(self) -> bool:
        return self._error is None

    def start(self) -> GpuMonitor:
        try:
            nvml = self._nvml or _import_nvml()
            nvml.nvmlInit()
        except ImportError:
            self._error = "NVML unavailable: the pynvml module (nvidia-ml-py) is not installed"
        except Exception as exc:  # noqa: BLE001 - NVMLError_LibraryNotFound, DriverNotLoaded, OSError ...
            self._error = f"NVML unavailable: {exc or type(exc).__name__}"
        else:
            self._nvml = nvml
            self._initialized = True
            try:
                self._driver = _text(nvml.nvmlSystemGetDriverVersion())
            except Exception:  # noqa: BLE001 - cosmetic
                self._driver = None
            try:
                self._handles = _visible_handles(nvml)
                self._uuids = {i: _uuid_or_empty(nvml, h) for i, h in self._handles}
                self._keys = {i: _handle_key(h) for i, h in self._handles}
                self._error = None
            except nvml.NVMLError as exc:
                self._error = f"NVML cannot list GPUs: {exc}"
        if self._error is not None:
            logger.info("GPU health: %s", self._error)
            self.snapshot = GpuReport(nvml=False, error=self._error)
            return self
        if self.watch_events:
            self._register_xid_events()
        self.snapshot = self.read()
        if self.watch_events or self.poll_interval > 0:
            self._thread = threading.Thread(target=self._run, name="gpu-monitor", daemon=True)
            self._thread.start()
        return self

    def _register_xid_events(self) -> None:
        nvml = self._nvml
        assert nvml is not None
        try:
            self._event_set = nvml.nvmlEventSetCreate()
        except Exception as exc:  # noqa: BLE001 - no event support at all: poll only
            logger.warning("GPU health: XID events cannot be watched: %s", exc)
            return
        for index, handle in self._handles:
            try:
                supported = int(nvml.nvmlDeviceGetSupportedEventTypes(handle))
                if supported & _XID_EVENT_TYPE:
                    nvml.nvmlDeviceRegisterEvents(handle, _XID_EVENT_TYPE, self._event_set)
                    self._watched.add(index)
            except Exception as exc:  # noqa: BLE001 - per GPU: reported as unsupported
                logger.info("GPU health: gpu %d: XID events not available: %s", index, exc)

    def read(self) -> GpuReport:
        """Read every visible GPU now (a few ms per GPU; call off the event loop)."""
        if self._error is not None or self._nvml is None:
            return GpuReport(nvml=False, error=self._error)
        gpus = []
        for index, handle in self._handles:
            reading = _read_gpu(self._nvml, index, handle)
            reading.uuid = reading.uuid or self._uuids.get(index) or None  # a lost GPU forgets its UUID
            reading.xid_watch = index in self._watched
            if not reading.xid_watch and self.watch_events:
                reading.unsupported.append("xid_events")
            with self._lock:
                log = self._xids.get(index)
                if log is not None:
                    reading.xid_events, reading.xid_counts = log.events(), dict(log.counts)
            gpus.append(reading)
        with self._lock:
            unattributed = self._xids[-1].events() if -1 in self._xids else []
        report = GpuReport(nvml=True, driver_version=self._driver, gpus=gpus, unattributed_xid_events=unattributed)
        self.snapshot = report
        return report

    def xid_events(self) -> list[XidEvent]:
        with self._lock:
            return [e for log in self._xids.values() for e in log.events()]

    def _record(self, data: Any) -> None:
        nvml = self._nvml
        assert nvml is not None
        # The event's handle identifies the device even when a lost GPU no longer tells its UUID.
        key = _handle_key(data.device)
        index = next((i for i, k in self._keys.items() if k == key), -1)
        uuid = self._uuids.get(index) or _uuid_or_empty(nvml, data.device)
        if index < 0:
            index = next((i for i, u in self._uuids.items() if u and u == uuid), -1)
        event = XidEvent(gpu=index, uuid=uuid, xid=int(data.eventData), time=time.time())
        log = logger.error if event.fatal else logger.warning
        log("GPU health: gpu %d (%s) reported %s", index, uuid, event.describe())
        with self._lock:
            self._xids.setdefault(index, XidLog()).add(event)

    def _run(self) -> None:
        next_poll = time.monotonic() + self.poll_interval
        while not self._stop.is_set():
            wait = max(0.0, next_poll - time.monotonic()) if self.poll_interval > 0 else 1.0
            if self._event_set is not None and self._watched:
                self._wait_event(min(wait, 1.0))
            else:
                self._stop.wait(min(wait, 1.0))
            if self.poll_interval > 0 and time.monotonic() >= next_poll and not self._stop.is_set():
                try:
                    self.read()
                except Exception:  # noqa: BLE001 - keep watching; the next poll may work
                    logger.exception("GPU health: reading NVML failed")
                next_poll = time.monotonic() + self.poll_interval

    def _wait_event(self, seconds: float) -> None:
        nvml = self._nvml
        assert nvml is not None
        try:
            data = nvml.nvmlEventSetWait_v2(self._event_set, max(1, int(seconds * 1000)))
        except nvml.NVMLError as exc:
            if _code(exc) != _TIMEOUT:
                logger.warning("GPU health: waiting for XID events failed: %s", exc)
                self._stop.wait(seconds)
            return
        if int(data.eventType) & _XID_EVENT_TYPE:
            self._record(data)
            # Refresh the snapshot now so that readiness flips without waiting for the next poll.
            try:
                self.read()
            except Exception:  # noqa: BLE001
                logger.exception("GPU health: reading NVML failed")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            self._thread = None
        nvml = self._nvml
        if nvml is None or not self._initialized:
            return
        self._initialized = False
        if self._event_set is not None:
            try:
                nvml.nvmlEventSetFree(self._event_set)
            except Exception:  # noqa: BLE001 - shutting down anyway
                pass
            self._event_set = None
        try:
            nvml.nvmlShutdown()
        except Exception:  # noqa: BLE001
            pass
        self._error = "NVML stopped"

    def __enter__(self) -> GpuMonitor:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _fmt(value: Any, unsupported: bool, fmt: Callable[[Any], str]) -> str:
    if value is None:
        return "n/a" if unsupported else "err"
    return fmt(value)


def _xid_summary(g: GpuReading) -> str:
    """``79,13x192``: each XID seen, in order of the kept events, with its count when above one."""
    order = list(dict.fromkeys(e.xid for e in g.xid_events))
    order += sorted(set(g.xid_counts) - set(order))
    return ",".join(f"{x}x{g.xid_counts[x]}" if g.xid_counts.get(x, 1) > 1 else str(x) for x in order) or "none"


def format_table(report: GpuReport) -> str:
    """A fixed-width table of a report, one row per GPU, for ``eagle3-appliance gpus``."""
    if not report.nvml:
        return f"no GPU readings: {report.error}"
    lines = [f"NVML driver {report.driver_version or 'unknown'}, {len(report.gpus)} visible GPU(s)"]
    header = ["GPU", "NAME", "UUID", "MEMORY", "UTIL", "TEMP", "POWER", "CLOCKS EVENTS", "ECC UNC", "ROW REMAP", "XID"]
    header.append("HEALTH")
    rows = [header]
    gib = 1024**3
    for g in report.gpus:
        un = set(g.unsupported)
        if g.memory_used_bytes is not None and g.memory_total_bytes is not None:
            memory = f"{g.memory_used_bytes / gib:.1f}/{g.memory_total_bytes / gib:.1f} GiB"
        else:
            memory = "n/a" if "memory" in un else "err"
        power = _fmt(g.power_draw_w, "power_draw" in un, lambda v: f"{v:.0f}")
        power += " / " + _fmt(g.power_limit_w, "power_limit" in un, lambda v: f"{v:.0f}") + " W"
        reasons = g.clocks_event_reasons
        if reasons is None:
            clocks = _fmt(None, "clocks_event_reasons" in un, str)
        else:
            clocks = ",".join(reasons) or "none"
        if g.remapped_rows_pending is None:
            remap = _fmt(None, "remapped_rows" in un, str)
        else:
            remap = "FAILED" if g.remapped_rows_failure else ("pending" if g.remapped_rows_pending else "ok")
        if g.xid_watch:
            xid = _xid_summary(g)
        else:
            xid = "n/a"
        fatal = g.fatal_reasons()
        rows.append(
            [
                str(g.index),
                g.name or "?",
                g.uuid or "?",
                memory,
                _fmt(g.utilization_gpu_percent, "utilization" in un, lambda v: f"{v}%"),
                _fmt(g.temperature_c, "temperature" in un, lambda v: f"{v}C"),
                power,
                clocks,
                _fmt(g.ecc_uncorrected_volatile, "ecc_uncorrected_volatile" in un, str),
                remap,
                xid,
                "FATAL: " + "; ".join(fatal) if fatal else "ok",
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    for g in report.gpus:
        for name, message in sorted(g.errors.items()):
            lines.append(f"gpu {g.index}: {name} failed: {message}")
    for event in report.unattributed_xid_events:
        lines.append(f"unidentified gpu: {event.describe()}" + (" FATAL" if event.fatal else ""))
    return "\n".join(lines)
