"""Training-side client for remote EAGLE-3 target appliances (and upstream servers).

Needs only torch, httpx and orjson: no web server, NVML or transformers.
"""

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
