"""The vision tensors of a ViSpec, MSD or DSpark ``/generate``, checked before any of them reaches the model.

Names: each must be a parameter of the forward the capture runs (:class:`VisionRules`); any
other is refused with its name, never dropped (upstream's wrappers drop them silently, which
would hide a mistyped key). Dtypes: ``pixel_values*`` floating (float32, bfloat16, float16 or the model's dtype),
everything else int32/int64. Sizes: the body's bytes are already bounded by ``--max-body-bytes``
and its entries by the decoder; here a pixel tensor's rows (patches) by the request's token
budget, a ``*_grid_thw`` by its pixel tensor's rows, and a ``[B,T]`` token-type tensor by the
batch's shape, so the vision tower never runs on more than the budget allows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from eagle3_appliance.errors import InvalidTensors
from eagle3_appliance.model.vlm import VisionRules

__all__ = ["validate_vision"]

_INTEGER = (torch.int64, torch.int32)
_MAX_DIMS = 5  # pixel_values [patches, dim] up to a video's [B, frames, C, H, W]
# Each grid names the pixel tensor whose rows (patches) it describes (Qwen2-VL family).
_GRIDS = {"image_grid_thw": "pixel_values", "video_grid_thw": "pixel_values_videos"}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def validate_vision(
    tensors: Mapping[str, torch.Tensor | None],
    names: Sequence[str],
    rules: VisionRules,
    batch_shape: torch.Size,
) -> dict[str, torch.Tensor]:
    """The request's vision tensors by name; :class:`InvalidTensors` (422) naming what is wrong."""
    undeclared = sorted(name for name in names if name not in rules.accepted)
    if undeclared:
        raise InvalidTensors(
            f"vision inputs {undeclared} are not inputs of this model's {rules.forward_name}; "
            f"it accepts {sorted(rules.accepted)}"
        )
    vision: dict[str, torch.Tensor] = {}
    for name in names:
        tensor = tensors[name]
        assert tensor is not None  # validate_generate refuses keys sent as None
        allowed = rules.pixel_dtypes if name.startswith("pixel_values") else _INTEGER
        if tensor.dtype not in allowed:
            names_ = ", ".join(_dtype_name(d) for d in allowed)
            raise InvalidTensors(f"{name} has dtype {_dtype_name(tensor.dtype)}; expected one of {names_}")
        if not 1 <= tensor.ndim <= _MAX_DIMS:
            raise InvalidTensors(f"{name} must have 1 to {_MAX_DIMS} dimensions, got shape {list(tensor.shape)}")
        if name.startswith("pixel_values"):
            if tensor.shape[0] > rules.max_patches:
                raise InvalidTensors(
                    f"{name} has {tensor.shape[0]} rows; this server takes at most {rules.max_patches} per request "
                    "(its token budget, a token per merged patch)"
                )
            if tensor.numel() and not bool(torch.isfinite(tensor).all()):
                raise InvalidTensors(f"{name} holds NaN or infinite values")
        elif tensor.numel() and int(tensor.min()) < 0:
            raise InvalidTensors(f"{name} must not be negative, got a value of {int(tensor.min())}")
        vision[name] = tensor
    for name, tensor in vision.items():
        if name.endswith("token_type_ids") and tensor.shape != batch_shape:
            raise InvalidTensors(f"{name} has shape {list(tensor.shape)}; input_ids has {list(batch_shape)}")
    for grid_name, pixels_name in _GRIDS.items():
        if grid_name in vision:
            _check_grid(grid_name, vision[grid_name], vision.get(pixels_name), pixels_name, rules.max_patches)
    return vision


def _check_grid(name: str, grid: torch.Tensor, pixels: torch.Tensor | None, pixels_name: str, most: int) -> None:
    """A ``[n, 3]`` grid of positive (t, h, w) whose patches add up to its pixel tensor's rows."""
    if grid.ndim != 2 or grid.shape[1] != 3 or grid.shape[0] == 0:
        raise InvalidTensors(f"{name} must be [images, 3] (t, h, w), got shape {list(grid.shape)}")
    low, high = int(grid.min()), int(grid.max())
    if low < 1 or high > most:
        raise InvalidTensors(f"{name} must lie in [1, {most}], got values in [{low}, {high}]")
    patches = float(grid.double().prod(dim=1).sum())  # in float64: no integer wrap, exact up to 2**53
    rows = None if pixels is None else int(pixels.shape[0])
    if rows is None or patches != rows:
        raise InvalidTensors(f"{name} describes {patches:.0f} patches; {pixels_name} has {rows} rows")
