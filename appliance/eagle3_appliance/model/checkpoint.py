"""Building the frozen model from a checkpoint, and saying where its weights went.

Three placements, one loader call each (all through transformers' ``from_pretrained``), with
the model class its config calls for (:func:`model_class`): ``AutoModelForImageTextToText`` for
a vision-language checkpoint (a config with a ``vision_config`` that class maps, as upstream's
ViSpec recipe loads its target), ``AutoModelForCausalLM`` for every other:

* one device (``--device``): the model whole on one device;
* a device map (``--device-map``, ``--max-memory``): accelerate puts whole layers on the
  node's devices and moves activations between them, in one process. Each layer runs the
  kernels it would run on one device, so the answers are bit-identical on one device type;
* tensor parallelism (``--tensor-parallel-size N``): transformers' tensor-parallel plan shards
  every attention and MLP projection over N processes (see :mod:`eagle3_appliance.model.tensor_parallel`).
  The partial sums meet in all-reduces, so the answers differ from one device's in the last
  bits (docs/large-targets.md has the measured difference).

``--loader automodel`` builds the model instead through NeMo AutoModel's EAGLE-3 recipe: its
own ``_setup_colocated_target`` on a real ``TrainEagle3Recipe``, so the recipe's argument
handling (dtype, ``target_force_hf``, ``target_attn_implementation``) and AutoModel's loader
(its model classes, Liger and SDPA patching) are the recipe's, not a copy of them.

No web framework and no Target here: the tensor-parallel worker processes load through the
same functions as the serving process.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from eagle3_appliance.model.builtin_model import ensure_builtin_model
from eagle3_appliance.model.fingerprint import local_shard
from eagle3_appliance.model.load_progress import loading_progress
from eagle3_appliance.settings import Loader, Settings, parse_device_map, parse_max_memory

__all__ = [
    "AUTOMODEL_RECIPE",
    "automodel_refusal",
    "build_model",
    "build_with_recipe",
    "from_pretrained_kwargs",
    "model_class",
    "placement_lines",
    "recipe_colocated_target",
    "resolve_source",
]

logger = logging.getLogger(__name__)

# The recipe whose co-located target ``--loader automodel`` reproduces.
AUTOMODEL_RECIPE = "nemo_automodel.recipes.llm.train_eagle3"


def resolve_source(settings: Settings) -> str | Path:
    """What ``from_pretrained`` reads: the built-in model's folder, a local folder or a hub id."""
    if settings.is_builtin:
        return ensure_builtin_model(settings.cache_dir)
    if settings.model.startswith(("/", "./", "../", "~")) and not Path(settings.model).expanduser().is_dir():
        # Otherwise transformers would take it for a hub id and complain about its form.
        raise ValueError(f"model folder {settings.model} does not exist (is the volume mounted?)")
    return settings.model


def from_pretrained_kwargs(settings: Settings, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """The keyword arguments of transformers' ``from_pretrained`` for these settings (tensor parallelism aside)."""
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": settings.trust_remote_code}
    if settings.attn_implementation:
        kwargs["attn_implementation"] = settings.attn_implementation
    device_map = parse_device_map(settings.device_map)
    if device_map is not None:
        kwargs["device_map"] = device_map
        # Where layers a map puts on "disk" are kept (read back for every forward).
        kwargs["offload_folder"] = str(Path(settings.cache_dir) / "offload")
        max_memory = parse_max_memory(settings.max_memory)
        if max_memory is not None:
            kwargs["max_memory"] = max_memory
    elif device.type == "cuda":
        kwargs["device_map"] = str(device)  # straight onto the GPU, without a CPU copy first
    return kwargs


def tensor_parallel_config(size: int) -> dict[str, Any]:
    """The ``from_pretrained`` argument that shards with the model's own tensor-parallel plan."""
    try:
        from transformers.distributed import DistributedConfig
    except ImportError:  # transformers before DistributedConfig: the plain arguments
        return {"tp_plan": "auto", "tp_size": size}
    return {"distributed_config": DistributedConfig(tp_size=size, tp_plan="auto")}


def build_model(settings: Settings, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The model of ``settings`` with its weights in place (in a tensor-parallel rank: this rank's shards).

    Tensor parallelism needs the process group to exist already (see
    :mod:`eagle3_appliance.model.tensor_parallel`).
    """
    source = resolve_source(settings)
    if settings.loader is Loader.automodel:
        return build_with_recipe(settings, source, device, dtype)
    model_type = model_class(source, settings.trust_remote_code)
    kwargs = from_pretrained_kwargs(settings, device, dtype)
    if settings.tensor_parallel_size > 1:
        kwargs.pop("device_map", None)  # the plan places the shards (rank r on device r)
        kwargs.update(tensor_parallel_config(settings.tensor_parallel_size))
    logger.info("loading %s as %s with %s (%s)", source, dtype, model_type.__name__, settings.placement_mode)
    tp = settings.tensor_parallel_size > 1 and torch.distributed.is_initialized()
    rank = torch.distributed.get_rank() if tp else None
    with loading_progress(source, rank):
        model: nn.Module = model_type.from_pretrained(source, **kwargs)
    if "device_map" not in kwargs and settings.tensor_parallel_size == 1 and device.type != "cuda":
        nn.Module.to(model, device)  # in place
    return model


def model_class(source: str | Path, trust_remote_code: bool = False) -> Any:
    """``AutoModelForImageTextToText`` for a vision-language config (it has a ``vision_config`` and the
    class maps it), else ``AutoModelForCausalLM``: a VLM's causal-LM class, where one exists, drops
    the vision tower that ViSpec and MSD run."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    mapping: Any = getattr(AutoModelForImageTextToText, "_model_mapping", {})
    if getattr(config, "vision_config", None) is not None and type(config) in mapping:
        return AutoModelForImageTextToText
    return AutoModelForCausalLM


# -- the recipe's loader (--loader automodel) ------------------------------------------------


def automodel_refusal(device: torch.device) -> str | None:
    """Why ``--loader automodel`` cannot run here, or None.

    AutoModel's loader places every model with ``torch.cuda`` (``NeMoAutoModelForCausalLM``
    reads the current CUDA device), so it needs a GPU as well as the package.
    """
    try:
        import importlib

        importlib.import_module(AUTOMODEL_RECIPE)
    except Exception as exc:  # noqa: BLE001 - any import failure means "not usable here"
        return (
            f"--loader automodel needs NeMo AutoModel ({AUTOMODEL_RECIPE} is not importable: "
            f"{type(exc).__name__}: {exc}); install nemo-automodel, or use --loader transformers"
        )
    if device.type != "cuda":
        return (
            f"--loader automodel needs CUDA: NeMo AutoModel's loader places the model with torch.cuda, and this "
            f"server runs on {device}. On the CPU use --loader transformers (with --attn-implementation as the "
            "recipe's target_attn_implementation): the recipe's target_force_hf loading"
        )
    return None


def recipe_config(settings: Settings, source: str | Path) -> dict[str, Any]:
    """The recipe's ``recipe_args`` that describe the target, from the server's options."""
    args: dict[str, Any] = {
        "target_model_name_or_path": str(source),
        "trust_remote_code": settings.trust_remote_code,
        "target_force_hf": settings.automodel_force_hf,
    }
    if settings.attn_implementation:
        args["target_attn_implementation"] = settings.attn_implementation
    if settings.aux_layer_ids is not None:
        args["aux_layer_ids"] = list(settings.aux_layer_ids)
    return args


def build_with_recipe(settings: Settings, source: str | Path, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The recipe's co-located target model (see :func:`recipe_colocated_target`)."""
    model: nn.Module = recipe_colocated_target(settings, source, device, dtype).target_model
    return model


def recipe_colocated_target(settings: Settings, source: str | Path, device: torch.device, dtype: torch.dtype) -> Any:
    """A ``TrainEagle3Recipe`` that has loaded its co-located target with its own ``_setup_colocated_target``.

    The recipe is given the state its ``setup()`` has reached when it loads the target
    (device, compute dtype, no distributed section, no context parallelism), then loads it
    exactly as in training: ``recipe.target_model`` is the model, ``recipe.target_wrapper``
    the recipe's own co-located backend. The caller has checked :func:`automodel_refusal`.
    """
    import importlib

    from nemo_automodel.components.config.loader import ConfigNode
    from transformers import AutoConfig

    recipe_module = importlib.import_module(AUTOMODEL_RECIPE)
    cfg = ConfigNode({"recipe_args": recipe_config(settings, source)})
    recipe = recipe_module.TrainEagle3Recipe(cfg)
    recipe.device = device
    recipe.compute_dtype = dtype
    recipe.dist_setup = None
    recipe.cp_mesh = None
    recipe.dp_mesh = None
    recipe.cp_mode = "ring"
    config = AutoConfig.from_pretrained(source, trust_remote_code=settings.trust_remote_code)
    text_config = getattr(config, "text_config", None)
    logger.info("loading %s through %s (recipe_args %s)", source, AUTOMODEL_RECIPE, cfg.recipe_args)
    recipe._setup_colocated_target(cfg.recipe_args, str(source), text_config if text_config is not None else config)
    return recipe


# -- where the weights went ----------------------------------------------------------------------


def _device_name(tensor: torch.Tensor) -> str:
    """Where a parameter lives; a device map's offloaded weights (read back per forward) are on "meta"."""
    device = str(local_shard(tensor).device)
    return "offload (disk or host, read back per forward)" if device == "meta" else device


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:,.1f} MiB"


def placement_lines(model: nn.Module, layers: list[nn.Module], mode: str, rank: int | None = None) -> list[str]:
    """What startup logs: which layers (or shards) are on which device, and the weight bytes per device."""
    weight_bytes: dict[str, int] = defaultdict(int)
    for tensor in [*model.parameters(), *model.buffers()]:
        local = local_shard(tensor)
        weight_bytes[_device_name(tensor)] += local.numel() * local.element_size()
    layer_devices: dict[str, list[int]] = defaultdict(list)
    for index, layer in enumerate(layers):
        first = next(iter(layer.parameters()), None)
        layer_devices[_device_name(first) if first is not None else "none"].append(index)
    sharded = sum(1 for p in model.parameters() if local_shard(p) is not p)
    lines = []
    for device in sorted(set(weight_bytes) | set(layer_devices)):
        ids = layer_devices.get(device, [])
        what = f"layers {_ranges(ids)}" if ids else "no decoder layer"
        if sharded:
            what += (
                f" ({sharded} of {sum(1 for _ in model.parameters())} weights as 1/{mode.removeprefix('tp=')} shards)"
            )
        who = mode if rank is None else f"{mode} rank {rank} (pid {os.getpid()})"
        line = f"{who}: {what} on {device}, {_mib(weight_bytes.get(device, 0))} of weights"
        if device.startswith("cuda") and torch.cuda.is_available():
            index = torch.device(device).index or 0
            total = torch.cuda.get_device_properties(index).total_memory
            line += f"; {_mib(torch.cuda.memory_allocated(index))} allocated of {_mib(total)}"
        lines.append(line)
    return lines


def _ranges(ids: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2, 5"``."""
    spans: list[str] = []
    start = prev = ids[0]
    for i in [*ids[1:], None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        spans.append(str(start) if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    return ", ".join(spans)
