"""Loading the target checkpoint (the built-in model, a local folder or a hub id) as a frozen :class:`Target`.

How the weights are placed (one device, a device map, tensor-parallel shards) and which loader
builds the model are :mod:`eagle3_appliance.model.checkpoint` and :mod:`eagle3_appliance.model.tensor_parallel`.
"""

from __future__ import annotations

import logging

import torch

from eagle3_appliance.model import checkpoint
from eagle3_appliance.model.target import Target
from eagle3_appliance.model.tensor_parallel import load_tensor_parallel
from eagle3_appliance.model.threads import apply_intra_op_threads
from eagle3_appliance.settings import Device, Dtype, Loader, Settings

__all__ = ["load_target", "resolve_device", "resolve_dtype"]

logger = logging.getLogger(__name__)


def resolve_device(device: Device) -> torch.device:
    if device is Device.auto:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device.value)


def resolve_dtype(dtype: Dtype, device: torch.device) -> torch.dtype:
    """``auto`` is bfloat16 on CUDA and float32 elsewhere (upstream's choice)."""
    if dtype is Dtype.auto:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    resolved: torch.dtype = getattr(torch, dtype.value)
    return resolved


def load_target(settings: Settings) -> Target:
    """Load ``settings.model`` as a frozen Target in ``settings.dtype``, placed as the settings say.

    ``ValueError`` for what the user can fix (a missing folder, a loader that cannot run here).
    Logs the placement: which layers or shards are on which device, and the weight bytes per device.
    """
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    if settings.loader is Loader.automodel:
        refusal = checkpoint.automodel_refusal(device)
        if refusal is not None:
            raise ValueError(refusal)
    if settings.tensor_parallel_size > 1:
        return load_tensor_parallel(settings, device, dtype)  # each rank sets its own threads
    apply_intra_op_threads(settings, device.type)
    model = checkpoint.build_model(settings, device, dtype)
    target = Target(model, settings.aux_layer_ids, name=settings.model, mode=settings.placement_mode)
    for line in checkpoint.placement_lines(model, target.layers, settings.placement_mode):
        logger.info("placement %s", line)
    if target.eagle3_refusal is not None:
        logger.warning("serving every capture but EAGLE-3: %s", target.eagle3_refusal)
    return target
