"""Training-side client for remote EAGLE-3 target appliances (and upstream servers).

Needs only torch, httpx and orjson: no web server, NVML or transformers.

The names below load on first use (PEP 562): the appliance imports ``client.protocol`` and
``client.wire``, and an eager ``client/__init__`` would drag the backend and, through
``client.contract``, all of NeMo AutoModel (seconds of imports) into every server start
on a machine where it is installed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from client.backend import RemoteEagle3TargetModel, RemoteResult
    from client.contract import USING_NEMO_AUTOMODEL, Eagle3TargetBackend, Eagle3TargetBatch
    from client.errors import (
        ProtocolViolation,
        RemoteTargetError,
        TargetHTTPError,
        TargetOverloaded,
        TargetTimeout,
        TargetUnreachable,
    )
    from client.negotiate import DataPlaneUnavailable
    from client.transfer import TransferError

_EXPORTS = {
    "DataPlaneUnavailable": "client.negotiate",
    "TransferError": "client.transfer",
    "USING_NEMO_AUTOMODEL": "client.contract",
    "Eagle3TargetBackend": "client.contract",
    "Eagle3TargetBatch": "client.contract",
    "ProtocolViolation": "client.errors",
    "RemoteEagle3TargetModel": "client.backend",
    "RemoteResult": "client.backend",
    "RemoteTargetError": "client.errors",
    "TargetHTTPError": "client.errors",
    "TargetOverloaded": "client.errors",
    "TargetTimeout": "client.errors",
    "TargetUnreachable": "client.errors",
}

__all__ = [
    "USING_NEMO_AUTOMODEL",
    "DataPlaneUnavailable",
    "Eagle3TargetBackend",
    "Eagle3TargetBatch",
    "ProtocolViolation",
    "RemoteEagle3TargetModel",
    "RemoteResult",
    "RemoteTargetError",
    "TargetHTTPError",
    "TargetOverloaded",
    "TargetTimeout",
    "TargetUnreachable",
    "TransferError",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'client' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
