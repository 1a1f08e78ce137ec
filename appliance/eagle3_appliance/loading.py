"""Loading the target checkpoint (the built-in model, a local folder or a hub id) as a frozen :class:`Target`."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from eagle3_appliance.builtin_model import ensure_builtin_model
from eagle3_appliance.settings import Device, Dtype, Settings
from eagle3_appliance.target import Target

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
    """Load ``settings.model`` as a frozen Target on ``settings.device`` in ``settings.dtype``."""
    from transformers import AutoModelForCausalLM

    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    source: str | Path = settings.model
    if settings.is_builtin:
        source = ensure_builtin_model(settings.cache_dir)
    elif settings.model.startswith(("/", "./", "../", "~")) and not Path(settings.model).expanduser().is_dir():
        # Otherwise transformers would take it for a hub id and complain about its form.
        raise ValueError(f"model folder {settings.model} does not exist (is the volume mounted?)")
    logger.info("loading %s as %s on %s", source, dtype, device)
    model = AutoModelForCausalLM.from_pretrained(
        source,
        dtype=dtype,
        device_map=str(device) if device.type == "cuda" else None,
        trust_remote_code=settings.trust_remote_code,
    )
    if device.type != "cuda":
        torch.nn.Module.to(model, device)  # in place
    return Target(model, settings.aux_layer_ids, name=settings.model)
