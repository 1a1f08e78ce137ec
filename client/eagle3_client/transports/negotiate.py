"""Choosing a data plane per server: what this process can do, what the server offers, what the user asked.

Tiers: ``nccl`` (GPU to GPU), ``gloo`` (CPU sockets, no HTTP framing), ``wire`` (the HTTP
body, upstream's fallback, always possible). ``auto`` takes the fastest tier both ends support,
in the order of :data:`AUTO_ORDER`: NCCL for a GPU trainer, else the wire. Gloo is never
chosen by ``auto``: it moves an answer at about half the wire's rate (one host, measured with
``benchmarks.transport``: 1,702 against 3,219 MB/s), and across hosts both ride one TCP
stream, the wire straight into the tensors' memory. Naming a tier forces it, and a forced
tier the pair cannot do is an error at connect time (a silent wire fallback would hide a
misconfigured cluster).

One GPU for both ends: NCCL cannot pair two ranks on one device (the group would hang or
fail), so when the trainer's GPU is one the server names in its session reply (by UUID,
:mod:`eagle3_client.transports.gpu_identity`) ``auto`` passes over NCCL to the next tier of
:data:`AUTO_ORDER`, the wire, and logs why; a forced ``nccl`` is a clear error. A server that
names no GPU (upstream, or an older appliance) leaves the ranking as it was. Every knob has a
keyword argument on ``RemoteEagle3TargetModel`` and an environment default
(:mod:`eagle3_client.options`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from eagle3_client import protocol
from eagle3_client.errors import RemoteTargetError
from eagle3_client.options import AUTO, DATA_PLANE_CHOICES
from eagle3_client.transports.gpu_identity import cuda_uuid, normal_uuid
from eagle3_client.transports.transfer import gloo_available, nccl_available

__all__ = [
    "AUTO",
    "AUTO_ORDER",
    "DataPlaneConfig",
    "DataPlaneUnavailable",
    "choose_tier",
    "local_tiers",
    "receive_device",
    "same_gpu_reason",
    "shared_gpu",
]

logger = logging.getLogger(__name__)


# What ``auto`` tries, fastest first (see the module docstring for why gloo is not in it).
AUTO_ORDER = (protocol.TIER_NCCL, protocol.TIER_WIRE)


class DataPlaneUnavailable(RemoteTargetError):
    """The data plane the user forced cannot be used with this server from this process."""


@dataclass(frozen=True)
class DataPlaneConfig:
    """The client's data-plane options (from :class:`eagle3_client.options.ClientOptions`).

    * ``preference`` - ``auto``, ``nccl``, ``gloo`` or ``wire``.
    * ``timeout`` - seconds one group transfer may take once its answer has arrived; past it
      the answer is fetched over the wire.
    * ``connect_timeout`` - seconds to join a group, hello included; a rendezvous across nodes
      can need longer.
    * ``backoff`` - seconds on the wire after a broken transfer before trying the group again;
      doubled after each consecutive failure up to ``max_backoff``.
    """

    preference: str = AUTO
    timeout: float = 60.0
    connect_timeout: float = 60.0
    backoff: float = 5.0
    max_backoff: float = 300.0

    def __post_init__(self) -> None:
        if self.preference not in DATA_PLANE_CHOICES:
            raise ValueError(f"data_plane must be one of {list(DATA_PLANE_CHOICES)}, got {self.preference!r}")
        if self.timeout <= 0 or self.connect_timeout <= 0 or self.backoff < 0:
            raise ValueError(
                "data-plane timeouts must be > 0 and the back-off >= 0, got "
                f"timeout={self.timeout}, connect_timeout={self.connect_timeout}, backoff={self.backoff}"
            )


def receive_device(device: torch.device) -> torch.device:
    """``cuda`` without an index means the GPU current *now*: pin it, because answers may be
    received on a prefetch thread, whose current GPU would otherwise be GPU 0."""
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return device


def local_tiers(device: torch.device, env: Mapping[str, str] | None = None) -> list[str]:
    """The tiers this process can take part in, best first (``wire`` always).

    NCCL needs a CUDA trainer device and NCCL in torch.distributed; upstream's
    ``NEMO_EAGLE_ENABLE_NCCL=0`` removes it. Gloo needs only torch.distributed.
    """
    env = os.environ if env is None else env
    tiers = []
    if device.type == "cuda" and nccl_available() and env.get(protocol.ENV_ENABLE_NCCL, "1") != "0":
        tiers.append(protocol.TIER_NCCL)
    if gloo_available():
        tiers.append(protocol.TIER_GLOO)
    tiers.append(protocol.TIER_WIRE)
    return tiers


def shared_gpu(device: torch.device, server_gpus: Sequence[str]) -> str | None:
    """The UUID of the trainer's GPU when the server's NCCL end is on it too; None otherwise or unknown."""
    if device.type != "cuda" or not server_gpus:
        return None
    mine = cuda_uuid(receive_device(device))
    if mine is None:
        return None
    return mine if mine.lower() in {normal_uuid(u).lower() for u in server_gpus} else None


def same_gpu_reason(uuid: str) -> str:
    """Why NCCL is out for a pair on one GPU (logged, in ``transport_stats``, in the forced-nccl error)."""
    return f"this trainer and the server are on the same GPU ({uuid}): NCCL cannot pair two ranks on one device"


def choose_tier(
    preference: str, local: Sequence[str], offered: Sequence[str], url: str, *, same_gpu: str | None = None
) -> str:
    """The tier to use with one server; raises :class:`DataPlaneUnavailable` for an impossible forced tier.

    ``same_gpu``: the UUID of the GPU both ends are on (:func:`shared_gpu`), which rules NCCL out.
    """
    if preference == AUTO:
        both = [t for t in AUTO_ORDER if t in local and t in offered]
        if same_gpu is not None and protocol.TIER_NCCL in both:
            tier = next((t for t in both if t != protocol.TIER_NCCL), protocol.TIER_WIRE)
            logger.info("%s: data plane %s instead of nccl: %s", url, tier, same_gpu_reason(same_gpu))
            return tier
        return next(iter(both), protocol.TIER_WIRE)
    if preference == protocol.TIER_WIRE:
        return preference
    if preference not in local:
        raise DataPlaneUnavailable(
            f"data_plane={preference!r} was requested for {url}, but this process can only do {list(local)} "
            f"(nccl needs a CUDA device and NCCL; use data_plane='auto' (EAGLE3_DATA_PLANE=auto) to fall back)"
        )
    if preference not in offered:
        raise DataPlaneUnavailable(
            f"data_plane={preference!r} was requested, but {url} offers only {list(offered)} "
            f"(an upstream server offers only wire; use data_plane='auto' (EAGLE3_DATA_PLANE=auto) to fall back)"
        )
    if preference == protocol.TIER_NCCL and same_gpu is not None:
        raise DataPlaneUnavailable(
            f"data_plane='nccl' was requested for {url}, but {same_gpu_reason(same_gpu)} (the group would hang "
            "or fail); put the trainer on another GPU, or use data_plane='auto' or 'wire' (EAGLE3_DATA_PLANE)"
        )
    return preference
