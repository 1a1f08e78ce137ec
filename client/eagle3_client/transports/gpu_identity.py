"""Which physical GPU a CUDA device of this process is: its UUID, comparable across processes.

Both ends of a data plane need it for one question: are the trainer and the server on the same
GPU? NCCL cannot pair two ranks on one device, so ``auto`` then takes the wire
(:mod:`eagle3_client.transports.negotiate`). Device indices say nothing across processes
(``CUDA_VISIBLE_DEVICES`` renumbers them); UUIDs do.

CUDA's own answer comes first (``torch.cuda.get_device_properties(i).uuid``): CUDA numbers the
visible devices by ``CUDA_DEVICE_ORDER``, which NVML cannot see. Without it (no CUDA in this
torch, an older torch) the answer is NVML's, through the ``pynvml`` module imported lazily at
this one boundary (tests put a fake ``pynvml`` there): the device at that place among
``CUDA_VISIBLE_DEVICES``, which is right for identical GPUs or ``CUDA_DEVICE_ORDER=PCI_BUS_ID``.
Nothing known is ``None``: the caller then decides as if the GPUs differ.
"""

from __future__ import annotations

import importlib
import logging
import os
from types import ModuleType
from typing import Any

import torch

__all__ = ["cuda_uuid", "normal_uuid", "uuid_or_empty", "visible_handles"]

logger = logging.getLogger(__name__)


def normal_uuid(value: str) -> str:
    """NVML's spelling, ``GPU-<hex groups>`` (``MIG-...`` kept as is); CUDA's lacks the prefix."""
    value = value.strip()
    return value if value.startswith(("GPU-", "MIG-")) else f"GPU-{value}"


def cuda_uuid(device: torch.device, nvml: ModuleType | None = None) -> str | None:
    """The UUID of the GPU behind ``device`` (``cuda`` without an index: the current one), or None."""
    if device.type != "cuda":
        return None
    cuda = torch.cuda.is_available()
    index = device.index if device.index is not None else (torch.cuda.current_device() if cuda else 0)
    if cuda:
        try:
            uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
        except (RuntimeError, AssertionError) as exc:
            logger.debug("no CUDA properties for device %d: %s", index, exc)
            uuid = None
        if uuid is not None and str(uuid):
            return normal_uuid(str(uuid))
    return _nvml_uuid(index, nvml)


def _nvml_uuid(index: int, nvml: ModuleType | None) -> str | None:
    try:
        nvml = nvml if nvml is not None else importlib.import_module("pynvml")
        nvml.nvmlInit()
    except Exception as exc:  # noqa: BLE001 - no driver, no library: identity unknown
        logger.debug("NVML unavailable for the GPU identity: %s", exc)
        return None
    try:
        handles = visible_handles(nvml)
        if not 0 <= index < len(handles):
            return None
        return uuid_or_empty(nvml, handles[index][1]) or None
    except Exception as exc:  # noqa: BLE001 - a broken reading means unknown, never an error
        logger.debug("NVML could not name CUDA device %d: %s", index, exc)
        return None
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception:  # noqa: BLE001
            pass


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def uuid_or_empty(nvml: ModuleType, handle: Any) -> str:
    """A device's NVML UUID, or "" when it does not answer (a lost GPU may not)."""
    try:
        return _text(nvml.nvmlDeviceGetUUID(handle))
    except Exception:  # noqa: BLE001 - a lost GPU may not answer even this
        return ""


def visible_handles(nvml: ModuleType) -> list[tuple[int, Any]]:
    """NVML devices the CUDA runtime of this process may use, as (NVML index, handle) in CUDA's order.

    ``CUDA_VISIBLE_DEVICES`` entries are NVML indices (the PCI order Slurm and Docker assign)
    or GPU UUIDs (prefixes allowed); like CUDA, the list ends at the first entry that names no
    device. Unset means every device NVML sees.
    """
    count = int(nvml.nvmlDeviceGetCount())
    handles = []
    for i in range(count):
        try:
            handles.append((i, nvml.nvmlDeviceGetHandleByIndex(i)))
        except nvml.NVMLError as exc:  # e.g. a device this job's cgroup does not allow
            logger.info("GPU health: NVML device %d is not accessible: %s", i, exc)
    spec = os.environ.get("CUDA_VISIBLE_DEVICES")
    if spec is None:
        return handles
    chosen: list[tuple[int, Any]] = []
    for item in (s.strip() for s in spec.split(",")):
        match = None
        if item.lstrip("-").isdigit():
            idx = int(item)
            match = next((h for h in handles if h[0] == idx), None)
        elif item:
            for i, handle in handles:
                uuid = uuid_or_empty(nvml, handle)
                if uuid and uuid.startswith((item, "GPU-" + item)):
                    match = (i, handle)
                    break
        if match is None:
            break
        if match not in chosen:
            chosen.append(match)
    return chosen
