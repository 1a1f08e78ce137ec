"""The ViSpec and MSD captures: a vision-language target's forward, run as upstream's wrappers run it.

Upstream's co-located ``HFVispecTargetModel`` and ``HFMSDTargetModel`` each make one call on the
frozen model; :func:`forward` makes exactly that call, on the same tensors, so the answer is
theirs bit for bit on the same device and dtype:

* ViSpec: ``model.model(input_ids=, attention_mask=, output_hidden_states=True, **vision,
  output_attentions=False, use_cache=False)`` (the two flags only where the base model's forward
  takes them or a ``**kwargs``); ``hidden_states[0]`` (the embedding output, vision features
  spliced in), ``hidden_states[-1]`` and ``model.lm_head(hidden_states[-1])``.
* MSD: ``model(output_hidden_states=True, return_dict=True, use_cache=False, input_ids=,
  attention_mask=, **vision)`` with a forward pre-hook on the language backbone
  (``model.model.language_model``, else ``model.model``) that takes its ``inputs_embeds``; the
  last hidden state and ``outputs.logits``.

The answer is those three tensors unshifted (:data:`eagle3_client.capture.VLM_KEYS`); the client
shifts them and derives the masks (the image mask from :func:`image_token_id`, sent in the
session reply), which are copies and comparisons, so nothing computed moves off the server.

Unlike upstream, a vision tensor the forward does not declare is refused, never dropped:
:class:`VisionRules` says which names, dtypes and sizes a request of this model may carry.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from eagle3_appliance.core.inputs import GenerateInputs
from eagle3_appliance.errors import ApplianceError, InvalidRequest
from eagle3_appliance.model.target import Target
from eagle3_client.capture import CAPTURE_VISPEC, KEY_HIDDEN_STATES, KEY_INPUTS_EMBEDS, KEY_LOGITS, Capture

__all__ = ["RESERVED_INPUTS", "VisionRules", "forward", "image_token_id", "request_fault", "vlm_refusal"]

# Forward parameters a request may not set: the server sets them (ids, mask, flags) or they
# are not tensors of a batch (caches, precomputed encoder outputs, labels, packing).
RESERVED_INPUTS = frozenset(
    {
        "input_ids",
        "attention_mask",
        "inputs_embeds",
        "position_ids",
        "cache_position",
        "cache",
        "past_key_values",
        "use_cache",
        "labels",
        "logits_to_keep",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
        "mm_encoder_outputs",
    }
)
_INTEGER = (torch.int64, torch.int32)


def image_token_id(model: nn.Module) -> int | None:
    """The image placeholder's token id from the model's config (what upstream's wrappers read), or None."""
    value = getattr(getattr(model, "config", None), "image_token_id", None)
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None


def vlm_refusal(target: Target, capture: Capture) -> str | None:
    """Why this server's model cannot serve a ViSpec or MSD ``capture`` as upstream's wrapper would, or None."""
    if not capture.is_vlm:
        return None
    model = target.model
    if image_token_id(model) is None:
        return (
            f"{type(model).__name__} is not a vision-language model: its config has no image_token_id "
            "(start the appliance on an image-text-to-text checkpoint)"
        )
    if not isinstance(getattr(model, "model", None), nn.Module) or not isinstance(
        getattr(model, "lm_head", None), nn.Module
    ):
        return f"{type(model).__name__} does not expose its base model as `model` and its LM head as `lm_head`"
    return None


def request_fault(exc: Exception, vision: Mapping[str, torch.Tensor]) -> bool:
    """Whether ``exc``, raised by the model's forward, is the request's fault (a 422, not a 500).

    With vision inputs, yes, unless the device or the memory failed: the request's checks
    (:mod:`eagle3_appliance.serving.vision_inputs`) cover what the Qwen-VL family's code reshapes
    and looks up, and what they cannot know of another family's vision tower (a patch layout, a
    token-type grouping) fails in its own code on the request's tensors. Such a failure must not
    read as a broken server, which a fleet takes out of its rotation.
    """
    broken = (torch.OutOfMemoryError, torch.AcceleratorError, MemoryError, ApplianceError)  # ours carry a status
    return bool(vision) and not isinstance(exc, broken)


def _forward_of(model: Any, capture: Capture) -> Any:
    """The module whose forward's parameters the vision inputs must be: ViSpec's base model, else the whole model.

    Its class names it: under a device map accelerate's hooks replace ``forward`` with a partial
    (no ``__self__``) that keeps the original's signature (``__wrapped__``).
    """
    return model.model if capture.kind == CAPTURE_VISPEC else model


@dataclass(frozen=True)
class VisionRules:
    """What the vision tensors of a request may be, for one model and capture.

    ``accepted``: the forward's named parameters less :data:`RESERVED_INPUTS`. ``pixel_dtypes``:
    a ``pixel_values*`` tensor is floating, float32, bfloat16, float16 or the model's dtype (upstream's
    VLM collate sends bfloat16 whatever the target's dtype; the vision tower casts to its own, so
    the tensor reaches the forward as sent, as in the co-located wrappers); every other vision
    tensor is int32/int64 (grids, token types). ``max_patches``: rows of a pixel tensor, at most a
    patch per token before the vision tower's merge (``spatial_merge_size ** 2`` patches a token).

    ``patch_dim`` and ``merge``: for a model that takes ``*_grid_thw`` (the Qwen-VL convention), a
    pixel tensor is ``[patches, in_channels x temporal_patch_size x patch_size ** 2]`` and a grid's
    height and width are multiples of ``spatial_merge_size``; the vision tower reshapes by both and
    would fail on anything else, so they are checked first (None / 1 where the config says nothing).
    """

    forward_name: str
    accepted: frozenset[str]
    pixel_dtypes: tuple[torch.dtype, ...]
    max_patches: int
    patch_dim: int | None = None
    merge: int = 1
    # The placeholder token id of each pixel tensor's images (the config's image/video_token_id):
    # a request's patches are at most merge**2 per placeholder it holds, as the model requires.
    placeholders: Mapping[str, int] = field(default_factory=dict)
    # An eager vision tower holds each frame's [heads, P, P] attention scores (float32): its heads,
    # and the bytes those scores may take (the request's working memory); None where its attention
    # kernel (SDPA, FlashAttention) needs no P x P matrix.
    eager_heads: int | None = None
    attention_budget: int | None = None

    @classmethod
    def of(
        cls, target: Target, capture: Capture, max_batch_tokens: int, working_bytes: int | None = None
    ) -> VisionRules:
        model = target.model
        module = _forward_of(model, capture)
        params = inspect.signature(module.forward).parameters
        named = (p for p in params.values() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD))
        accepted = frozenset(p.name for p in named) - RESERVED_INPUTS
        vision_config = getattr(target.config, "vision_config", None)
        merge = _positive(vision_config, "spatial_merge_size") or 1
        sizes = [_positive(vision_config, name) for name in ("in_channels", "temporal_patch_size", "patch_size")]
        patch_dim = None
        if "image_grid_thw" in accepted and all(sizes):
            channels, temporal, patch = sizes
            patch_dim = channels * temporal * patch * patch  # type: ignore[operator]
        dtypes = tuple(dict.fromkeys((torch.float32, torch.bfloat16, torch.float16, target.dtype)))
        name = f"{type(module).__name__}.forward"
        config = target.model.config
        tokens = {"pixel_values": "image_token_id", "pixel_values_videos": "video_token_id"}
        placeholders = {
            k: v for k, key in tokens.items() if (v := _positive(config, key)) is not None and k in accepted
        }
        eager = getattr(vision_config, "_attn_implementation", None) == "eager"
        heads = _positive(vision_config, "num_heads") if eager and patch_dim is not None else None
        return cls(
            name,
            accepted,
            dtypes,
            max_batch_tokens * merge * merge,
            patch_dim=patch_dim,
            merge=merge,
            placeholders=placeholders if patch_dim is not None else {},
            eager_heads=heads,
            attention_budget=working_bytes if heads is not None else None,
        )


def _positive(config: Any, name: str) -> int | None:
    value = getattr(config, name, None)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a possibly sharded one (upstream's ViSpec gathers a DTensor's logits)."""
    full = getattr(tensor, "full_tensor", None)
    return full() if callable(full) else tensor


def _vispec(model: Any, inputs: GenerateInputs) -> dict[str, torch.Tensor]:
    base = model.model
    params = inspect.signature(base.forward).parameters
    any_keyword = any(p.kind is p.VAR_KEYWORD for p in params.values())
    flags = {name: False for name in ("output_attentions", "use_cache") if name in params or any_keyword}
    outputs = base(
        input_ids=inputs.input_ids,
        attention_mask=inputs.attention_mask,
        output_hidden_states=True,
        **inputs.vision,
        **flags,
    )
    states = outputs.hidden_states
    last = states[-1]
    return {KEY_INPUTS_EMBEDS: states[0], KEY_HIDDEN_STATES: last, KEY_LOGITS: _full(model.lm_head(last))}


def _msd(model: Any, inputs: GenerateInputs) -> dict[str, torch.Tensor]:
    backbone = getattr(model.model, "language_model", model.model)
    slot: dict[str, torch.Tensor] = {}

    def take(_module: nn.Module, _args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        embeds = kwargs.get("inputs_embeds")
        if isinstance(embeds, torch.Tensor):
            slot["embeds"] = embeds

    handle = backbone.register_forward_pre_hook(take, with_kwargs=True)
    try:
        outputs = model(
            output_hidden_states=True,
            return_dict=True,
            use_cache=False,
            input_ids=inputs.input_ids,
            attention_mask=inputs.attention_mask,
            **inputs.vision,
        )
    finally:
        handle.remove()
    if "embeds" not in slot:
        raise RuntimeError("the language backbone received no inputs_embeds: MSD needs a VLM that fuses them first")
    return {KEY_INPUTS_EMBEDS: slot["embeds"], KEY_HIDDEN_STATES: outputs.hidden_states[-1], KEY_LOGITS: outputs.logits}


@torch.no_grad()
def forward(target: Target, capture: Capture, inputs: GenerateInputs) -> dict[str, torch.Tensor]:
    """The ViSpec or MSD answer for one request (on the model's device), keyed in ``capture.keys`` order.

    A ``ValueError`` from the model (its vision inputs disagree with the placeholders, say) is
    the request's fault: 422 with the model's message; so is any error on vision inputs
    (:func:`request_fault`).
    """
    run = _vispec if capture.kind == CAPTURE_VISPEC else _msd
    try:
        # A tensor-parallel target's other ranks make the same call (eagle3_appliance.model.tensor_parallel).
        with target.lockstep_step(
            inputs.input_ids, inputs.attention_mask, vision=inputs.vision, vlm_capture=capture.kind
        ):
            answer = run(target.model, inputs)
    except Exception as exc:
        if not (isinstance(exc, ValueError) or request_fault(exc, inputs.vision)):
            raise
        raise InvalidRequest(f"the model refused this {capture.label} request's inputs: {exc!r}") from None
    finally:
        target.clear_captures()  # the aux-layer hooks fired too; their tensors are not kept
    return {key: answer[key] for key in capture.keys}
