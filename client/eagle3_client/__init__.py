"""Training-side client for remote EAGLE-3 target appliances (and upstream servers).

Needs only torch, httpx and orjson: no web server, NVML or transformers.

The names below load on first use (PEP 562): the appliance imports ``eagle3_client.protocol`` and
``eagle3_client.wire``, and an eager ``eagle3_client/__init__`` would drag the backend and, through
``eagle3_client.contract``, all of NeMo AutoModel (seconds of imports) into every server start
on a machine where it is installed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from eagle3_client.backend import RemoteEagle3TargetModel
    from eagle3_client.capture import Capture
    from eagle3_client.contract import USING_NEMO_AUTOMODEL, Eagle3TargetBackend, Eagle3TargetBatch
    from eagle3_client.dflash import RemoteDFlashTargetModel
    from eagle3_client.dspark import RemoteDSparkTargetModel
    from eagle3_client.eagle import RemoteEagleTargetModel
    from eagle3_client.errors import (
        CapabilityUnavailable,
        CaptureUnsupported,
        ModelMismatch,
        NoServerReady,
        ProtocolViolation,
        RemoteTargetError,
        TargetHTTPError,
        TargetOverloaded,
        TargetTimeLimit,
        TargetTimeout,
        TargetUnreachable,
    )
    from eagle3_client.msd import RemoteMSDTargetModel
    from eagle3_client.remote.core import RemoteResult
    from eagle3_client.transports.negotiate import DataPlaneUnavailable
    from eagle3_client.transports.transfer import TransferError
    from eagle3_client.vispec import RemoteVispecTargetModel

_EXPORTS = {
    "Capture": "eagle3_client.capture",
    "CaptureUnsupported": "eagle3_client.errors",
    "RemoteDFlashTargetModel": "eagle3_client.dflash",
    "RemoteDSparkTargetModel": "eagle3_client.dspark",
    "RemoteEagleTargetModel": "eagle3_client.eagle",
    "RemoteMSDTargetModel": "eagle3_client.msd",
    "RemoteVispecTargetModel": "eagle3_client.vispec",
    "DataPlaneUnavailable": "eagle3_client.transports.negotiate",
    "TransferError": "eagle3_client.transports.transfer",
    "USING_NEMO_AUTOMODEL": "eagle3_client.contract",
    "Eagle3TargetBackend": "eagle3_client.contract",
    "Eagle3TargetBatch": "eagle3_client.contract",
    "CapabilityUnavailable": "eagle3_client.errors",
    "ModelMismatch": "eagle3_client.errors",
    "NoServerReady": "eagle3_client.errors",
    "ProtocolViolation": "eagle3_client.errors",
    "RemoteEagle3TargetModel": "eagle3_client.backend",
    "RemoteResult": "eagle3_client.remote.core",
    "RemoteTargetError": "eagle3_client.errors",
    "TargetHTTPError": "eagle3_client.errors",
    "TargetOverloaded": "eagle3_client.errors",
    "TargetTimeLimit": "eagle3_client.errors",
    "TargetTimeout": "eagle3_client.errors",
    "TargetUnreachable": "eagle3_client.errors",
}

__all__ = [
    "USING_NEMO_AUTOMODEL",
    "CapabilityUnavailable",
    "Capture",
    "CaptureUnsupported",
    "DataPlaneUnavailable",
    "Eagle3TargetBackend",
    "Eagle3TargetBatch",
    "ModelMismatch",
    "NoServerReady",
    "ProtocolViolation",
    "RemoteDFlashTargetModel",
    "RemoteDSparkTargetModel",
    "RemoteEagle3TargetModel",
    "RemoteEagleTargetModel",
    "RemoteMSDTargetModel",
    "RemoteResult",
    "RemoteTargetError",
    "RemoteVispecTargetModel",
    "TargetHTTPError",
    "TargetOverloaded",
    "TargetTimeLimit",
    "TargetTimeout",
    "TargetUnreachable",
    "TransferError",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'eagle3_client' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
