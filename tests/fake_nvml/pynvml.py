"""A fake ``pynvml`` for tests: the same functions, constants and error classes the appliance
uses, answering from a state that tests control.

In-process, call :func:`configure` with a state dict. For a server subprocess, put this
folder first on ``PYTHONPATH`` and point ``FAKE_NVML_STATE`` at a JSON file; the file is
re-read whenever it changes, so a test flips a GPU's condition by rewriting it.

State::

    {"init_error": null | 12 (an NVML error code nvmlInit raises),
     "driver_version": "550.54.15",
     "gpus": [{"name", "uuid", "memory_used", "memory_total", "util_gpu", "util_memory",
               "temperature", "power_mw", "power_limit_mw", "clocks_event_reasons",
               "ecc_uncorrected_volatile", "remapped_rows": [corr, unc, pending, failure],
               "lost": false, "lost_uuid": false, "unsupported": ["power_draw", "ecc", ...]}],
     "xid_events": [{"gpu": 0, "xid": 79}]}

``unsupported`` names: name, uuid, memory, utilization, temperature, power_draw,
power_limit, clocks, ecc, remapped_rows, events. Each XID event is delivered once per
event set, in order, to a set that registered that GPU.
"""

from __future__ import annotations

import json
import os
import threading
import time
from types import SimpleNamespace
from typing import Any

NVML_SUCCESS = 0
NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_TIMEOUT = 10
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_FUNCTION_NOT_FOUND = 13
NVML_ERROR_GPU_IS_LOST = 15
NVML_ERROR_UNKNOWN = 999

NVML_TEMPERATURE_GPU = 0
NVML_MEMORY_ERROR_TYPE_CORRECTED = 0
NVML_MEMORY_ERROR_TYPE_UNCORRECTED = 1
NVML_VOLATILE_ECC = 0
NVML_AGGREGATE_ECC = 1

nvmlEventTypeSingleBitEccError = 0x1
nvmlEventTypeDoubleBitEccError = 0x2
nvmlEventTypePState = 0x4
nvmlEventTypeXidCriticalError = 0x8
nvmlEventTypeClock = 0x10

_MESSAGES = {
    NVML_ERROR_UNINITIALIZED: "Uninitialized",
    NVML_ERROR_NOT_SUPPORTED: "Not Supported",
    NVML_ERROR_DRIVER_NOT_LOADED: "Driver Not Loaded",
    NVML_ERROR_TIMEOUT: "Timeout",
    NVML_ERROR_LIBRARY_NOT_FOUND: "NVML Shared Library Not Found",
    NVML_ERROR_FUNCTION_NOT_FOUND: "Function Not Found",
    NVML_ERROR_GPU_IS_LOST: "GPU is lost",
    NVML_ERROR_UNKNOWN: "Unknown Error",
}


class NVMLError(Exception):
    """Like the real one: ``NVMLError(code)`` returns the subclass for that code."""

    _valClassMapping: dict[int, type] = {}

    def __new__(cls, value: int) -> NVMLError:
        if cls is NVMLError:
            cls = NVMLError._valClassMapping.get(value, cls)
        obj = Exception.__new__(cls)
        obj.value = value
        return obj

    def __init__(self, value: int) -> None:
        super().__init__(value)
        self.value = value

    def __str__(self) -> str:
        return _MESSAGES.get(self.value, f"NVML Error with code {self.value}")


def _error_class(name: str, code: int) -> type:
    cls = type(name, (NVMLError,), {})
    NVMLError._valClassMapping[code] = cls
    return cls


NVMLError_Uninitialized = _error_class("NVMLError_Uninitialized", NVML_ERROR_UNINITIALIZED)
NVMLError_NotSupported = _error_class("NVMLError_NotSupported", NVML_ERROR_NOT_SUPPORTED)
NVMLError_DriverNotLoaded = _error_class("NVMLError_DriverNotLoaded", NVML_ERROR_DRIVER_NOT_LOADED)
NVMLError_Timeout = _error_class("NVMLError_Timeout", NVML_ERROR_TIMEOUT)
NVMLError_LibraryNotFound = _error_class("NVMLError_LibraryNotFound", NVML_ERROR_LIBRARY_NOT_FOUND)
NVMLError_FunctionNotFound = _error_class("NVMLError_FunctionNotFound", NVML_ERROR_FUNCTION_NOT_FOUND)
NVMLError_GpuIsLost = _error_class("NVMLError_GpuIsLost", NVML_ERROR_GPU_IS_LOST)

_lock = threading.Lock()
_state: dict[str, Any] = {"gpus": []}
_file_mtime: float | None = None
_initialized = 0
calls: list[str] = []  # every function called, for tests that check NVML stayed off a path


def configure(state: dict[str, Any]) -> None:
    """Replace the state (in-process tests)."""
    global _state, _initialized
    with _lock:
        _state = json.loads(json.dumps(state))
        _initialized = 0
        calls.clear()


def _current() -> dict[str, Any]:
    global _state, _file_mtime
    path = os.environ.get("FAKE_NVML_STATE")
    if path:
        try:
            mtime = os.stat(path).st_mtime_ns
        except FileNotFoundError:
            mtime = None
        if mtime is not None and mtime != _file_mtime:
            with open(path) as f:
                _state = json.load(f)
            _file_mtime = mtime
    return _state


def _check_init() -> dict[str, Any]:
    if not _initialized:
        raise NVMLError(NVML_ERROR_UNINITIALIZED)
    return _current()


class _Handle:
    """Like NVML's device handles: two handles of one device compare equal."""

    def __init__(self, index: int) -> None:
        self.index = index

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Handle) and other.index == self.index

    def __hash__(self) -> int:
        return hash(self.index)

    def __repr__(self) -> str:
        return f"<fake nvmlDevice {self.index}>"


def _gpu(handle: _Handle, feature: str) -> dict[str, Any]:
    calls.append(feature)
    gpus = _check_init()["gpus"]
    gpu = gpus[handle.index]
    if gpu.get("lost") and (feature not in ("uuid", "name") or gpu.get("lost_uuid")):
        raise NVMLError(NVML_ERROR_GPU_IS_LOST)
    if feature in gpu.get("unsupported", ()):
        raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
    return gpu


def nvmlInit() -> None:
    global _initialized
    state = _current()
    if state.get("init_error"):
        raise NVMLError(int(state["init_error"]))
    _initialized += 1


def nvmlShutdown() -> None:
    global _initialized
    _check_init()
    _initialized -= 1


def nvmlSystemGetDriverVersion() -> str:
    return str(_check_init().get("driver_version", "550.54.15"))


def nvmlDeviceGetCount() -> int:
    return len(_check_init()["gpus"])


def nvmlDeviceGetHandleByIndex(index: int) -> _Handle:
    if not 0 <= index < nvmlDeviceGetCount():
        raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
    return _Handle(index)


def nvmlDeviceGetName(handle: _Handle) -> str:
    return str(_gpu(handle, "name").get("name", "NVIDIA Fake GPU"))


def nvmlDeviceGetUUID(handle: _Handle) -> str:
    return str(_gpu(handle, "uuid").get("uuid", f"GPU-fake-{handle.index}"))


def nvmlDeviceGetMemoryInfo(handle: _Handle) -> SimpleNamespace:
    gpu = _gpu(handle, "memory")
    used, total = int(gpu.get("memory_used", 0)), int(gpu.get("memory_total", 80 * 1024**3))
    return SimpleNamespace(used=used, total=total, free=total - used)


def nvmlDeviceGetUtilizationRates(handle: _Handle) -> SimpleNamespace:
    gpu = _gpu(handle, "utilization")
    return SimpleNamespace(gpu=int(gpu.get("util_gpu", 0)), memory=int(gpu.get("util_memory", 0)))


def nvmlDeviceGetTemperature(handle: _Handle, sensor: int) -> int:
    if sensor != NVML_TEMPERATURE_GPU:
        raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
    return int(_gpu(handle, "temperature").get("temperature", 40))


def nvmlDeviceGetPowerUsage(handle: _Handle) -> int:
    return int(_gpu(handle, "power_draw").get("power_mw", 100_000))


def nvmlDeviceGetEnforcedPowerLimit(handle: _Handle) -> int:
    return int(_gpu(handle, "power_limit").get("power_limit_mw", 700_000))


def nvmlDeviceGetCurrentClocksEventReasons(handle: _Handle) -> int:
    return int(_gpu(handle, "clocks").get("clocks_event_reasons", 0))


def nvmlDeviceGetTotalEccErrors(handle: _Handle, error_type: int, counter_type: int) -> int:
    gpu = _gpu(handle, "ecc")
    if error_type == NVML_MEMORY_ERROR_TYPE_UNCORRECTED and counter_type == NVML_VOLATILE_ECC:
        return int(gpu.get("ecc_uncorrected_volatile", 0))
    return 0


def nvmlDeviceGetRemappedRows(handle: _Handle) -> tuple[int, int, int, int]:
    rows = _gpu(handle, "remapped_rows").get("remapped_rows", [0, 0, 0, 0])
    return tuple(int(v) for v in rows)  # type: ignore[return-value]


def nvmlDeviceGetSupportedEventTypes(handle: _Handle) -> int:
    gpu = _gpu(handle, "events")
    return int(gpu.get("event_types", nvmlEventTypeXidCriticalError | nvmlEventTypeDoubleBitEccError))


class _EventSet:
    def __init__(self) -> None:
        self.devices: dict[int, int] = {}
        self.delivered = 0
        self.freed = False


def nvmlEventSetCreate() -> _EventSet:
    _check_init()
    calls.append("event_set_create")
    return _EventSet()


def nvmlDeviceRegisterEvents(handle: _Handle, event_types: int, event_set: _EventSet) -> None:
    _gpu(handle, "events")
    event_set.devices[handle.index] = event_set.devices.get(handle.index, 0) | int(event_types)


def nvmlEventSetWait_v2(event_set: _EventSet, timeout_ms: int) -> SimpleNamespace:
    deadline = time.monotonic() + timeout_ms / 1000.0
    while True:
        events = _check_init().get("xid_events", [])
        while event_set.delivered < len(events):
            event = events[event_set.delivered]
            event_set.delivered += 1
            gpu = int(event.get("gpu", 0))
            if event_set.devices.get(gpu, 0) & nvmlEventTypeXidCriticalError:
                return SimpleNamespace(
                    device=_Handle(gpu),
                    eventType=nvmlEventTypeXidCriticalError,
                    eventData=int(event["xid"]),
                    gpuInstanceId=0xFFFFFFFF,
                    computeInstanceId=0xFFFFFFFF,
                )
        if time.monotonic() >= deadline:
            raise NVMLError(NVML_ERROR_TIMEOUT)
        time.sleep(min(0.02, max(0.0, deadline - time.monotonic())))


def nvmlEventSetWait(event_set: _EventSet, timeout_ms: int) -> SimpleNamespace:
    return nvmlEventSetWait_v2(event_set, timeout_ms)


def nvmlEventSetFree(event_set: _EventSet) -> None:
    event_set.freed = True
