"""The vision tensors of a ViSpec, MSD or DSpark ``/generate``, checked before any of them reaches the model.

Names: each must be a parameter of the forward the capture runs (:class:`VisionRules`); any
other is refused with its name, never dropped (upstream's wrappers drop them silently, which
would hide a mistyped key). Dtypes: ``pixel_values*`` floating (float32, bfloat16, float16 or the model's dtype),
everything else int32/int64. Sizes: the body's bytes are already bounded by ``--max-body-bytes``
and its entries by the decoder; here a pixel tensor's rows (patches) by the request's token
budget, a ``*_grid_thw`` by its pixel tensor's rows, and a ``[B,T]`` token-type tensor by the
batch's shape, so the vision tower never runs on more than the budget allows. Where the model
names its placeholder tokens, what the model itself requires: a pixel tensor's rows are
``merge ** 2`` a placeholder in ``input_ids``, and one image's (frame x height x width) patches
by ``merge ** 2`` times a row's length (its placeholders lie in one row). Structure, where the
model follows the Qwen-VL convention (it takes ``*_grid_thw``): a pixel tensor comes with its grid
and has the vision config's patch size, a grid's height and width are multiples of the merge
size, and token types are 0 (text), 1 (image) or 2 (video); the model's own code would crash on
anything else (a 500 that takes the server out of a fleet), so the request gets a 422 instead.
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
_TOKEN_TYPES = 2  # text 0, image 1, video 2
# Floating inputs that are not pixels: Qwen2.5-VL's seconds per temporal patch of each video.
_FLOATING = {"second_per_grid_ts": (torch.float32, torch.float64)}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def validate_vision(
    tensors: Mapping[str, torch.Tensor | None],
    names: Sequence[str],
    rules: VisionRules,
    input_ids: torch.Tensor,
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
        allowed = rules.pixel_dtypes if name.startswith("pixel_values") else _FLOATING.get(name, _INTEGER)
        if tensor.dtype not in allowed:
            names_ = ", ".join(_dtype_name(d) for d in allowed)
            raise InvalidTensors(f"{name} has dtype {_dtype_name(tensor.dtype)}; expected one of {names_}")
        if not 1 <= tensor.ndim <= _MAX_DIMS:
            raise InvalidTensors(f"{name} must have 1 to {_MAX_DIMS} dimensions, got shape {list(tensor.shape)}")
        if name.startswith("pixel_values"):
            _check_patches(name, int(tensor.shape[0]), input_ids, rules)
            if tensor.numel() and not bool(torch.isfinite(tensor).all()):
                raise InvalidTensors(f"{name} holds NaN or infinite values")
        elif name in _FLOATING:
            if tensor.ndim != 1 or (tensor.numel() and not bool((torch.isfinite(tensor) & (tensor >= 0)).all())):
                raise InvalidTensors(f"{name} must be one finite, non-negative value a video")
        elif tensor.numel() and int(tensor.min()) < 0:
            raise InvalidTensors(f"{name} must not be negative, got a value of {int(tensor.min())}")
        vision[name] = tensor
    for name, tensor in vision.items():
        if name.endswith("token_type_ids"):
            if tensor.shape != input_ids.shape:
                raise InvalidTensors(f"{name} has shape {list(tensor.shape)}; input_ids has {list(input_ids.shape)}")
            if rules.patch_dim is not None and tensor.numel() and int(tensor.max()) > _TOKEN_TYPES:
                raise InvalidTensors(
                    f"{name} must lie in [0, {_TOKEN_TYPES}] (text, image, video), got a value of {int(tensor.max())}"
                )
    seconds = vision.get("second_per_grid_ts")
    if seconds is not None and seconds.shape[0] != (rows := len(vision.get("video_grid_thw", ()))):
        raise InvalidTensors(f"second_per_grid_ts has {seconds.shape[0]} values; video_grid_thw has {rows} videos")
    for grid_name, pixels_name in _GRIDS.items():
        pixels = vision.get(pixels_name)
        if pixels is not None and rules.patch_dim is not None:
            if pixels.ndim != 2 or pixels.shape[1] != rules.patch_dim:
                raise InvalidTensors(
                    f"{pixels_name} must be [patches, {rules.patch_dim}] (channels x temporal patch x patch x "
                    f"patch of the vision config), got shape {list(pixels.shape)}"
                )
            if grid_name not in vision:
                raise InvalidTensors(f"{pixels_name} comes without {grid_name}, which says how its patches form images")
        if grid_name in vision:
            _check_grid(grid_name, vision[grid_name], pixels, pixels_name, rules)
            per_image = rules.merge * rules.merge * int(input_ids.shape[-1])
            largest = int(vision[grid_name].prod(dim=1).max())  # at most the pixel rows (_check_grid): no wrap
            if pixels_name in rules.placeholders and largest > per_image:
                raise InvalidTensors(
                    f"{grid_name} holds an image of {largest} patches; one image's placeholders lie in one row "
                    f"of {input_ids.shape[-1]} tokens, {per_image} patches at most"
                )
            _check_attention(grid_name, vision[grid_name], rules)
    return vision


def _check_attention(name: str, grid: torch.Tensor, rules: VisionRules) -> None:
    """An eager vision tower's attention scores, ``heads x P x P`` float32 a frame of P patches, held
    one frame at a time but counted for every frame (the tower's layers run them together): within
    the request's working memory. SDPA and FlashAttention need no such matrix and are not bounded here."""
    if rules.eager_heads is None or rules.attention_budget is None:
        return
    frames, per_frame = grid[:, 0].double(), (grid[:, 1] * grid[:, 2]).double()
    need = float((frames * per_frame * per_frame).sum()) * rules.eager_heads * 4
    if need > rules.attention_budget:
        raise InvalidTensors(
            f"{name} asks the vision tower's eager attention for {need:,.0f} bytes of scores, above this "
            f"request's {rules.attention_budget:,} bytes of working memory: send smaller images "
            "(or serve with an attention implementation that needs no P x P matrix, e.g. sdpa)"
        )


def _check_patches(name: str, rows: int, input_ids: torch.Tensor, rules: VisionRules) -> None:
    """A pixel tensor's rows: exactly ``merge ** 2`` a placeholder token where the model names its
    placeholders (the model's own check, made before any rank of a tensor-parallel target runs),
    else at most the token budget allows."""
    token = rules.placeholders.get(name)
    if token is None:
        if rows > rules.max_patches:
            raise InvalidTensors(
                f"{name} has {rows} rows; this request may carry at most {rules.max_patches} "
                "(the server's token budget, a token per merged patch)"
            )
        return
    count = int((input_ids == token).sum())
    per = rules.merge * rules.merge
    if rows != count * per:
        raise InvalidTensors(
            f"{name} has {rows} rows; the request's {count} placeholder tokens (id {token}) take "
            f"{count * per} ({per} patches each)"
        )


def _check_grid(
    name: str, grid: torch.Tensor, pixels: torch.Tensor | None, pixels_name: str, rules: VisionRules
) -> None:
    """A ``[n, 3]`` grid of positive (t, h, w), h and w multiples of the merge size, whose patches
    add up to its pixel tensor's rows."""
    if grid.ndim != 2 or grid.shape[1] != 3 or grid.shape[0] == 0:
        raise InvalidTensors(f"{name} must be [images, 3] (t, h, w), got shape {list(grid.shape)}")
    low, high, most = int(grid.min()), int(grid.max()), rules.max_patches
    if low < 1 or high > most:
        raise InvalidTensors(f"{name} must lie in [1, {most}], got values in [{low}, {high}]")
    if bool((grid[:, 1:] % rules.merge != 0).any()):
        raise InvalidTensors(
            f"{name}'s height and width must be multiples of the vision tower's merge size {rules.merge}, "
            f"got {grid.tolist()}"
        )
    patches = float(grid.double().prod(dim=1).sum())  # in float64: no integer wrap, exact up to 2**53
    rows = None if pixels is None else int(pixels.shape[0])
    if rows is None or patches != rows:
        raise InvalidTensors(f"{name} describes {patches:.0f} patches; {pixels_name} has {rows} rows")
