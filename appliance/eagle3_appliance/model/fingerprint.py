"""A model fingerprint: one string that differs when two servers would compute different supervision.

A trainer that spreads its batches over a fleet needs every server to serve the same model;
the client compares the servers' fingerprints (session reply, ``/model_info``) and refuses a
fleet that mixes models. What goes in, and why:

* the model config (``config.to_dict()``), minus what only says where or when it was saved
  (``_name_or_path``, ``transformers_version``, the saved dtype...), plus the attention
  implementation transformers chose (it changes the bits);
* the dtype the weights were loaded in, the aux-layer ids and the loader mode
  (``"single"``, or a tensor-parallel / device-map mode): the same checkpoint loaded another
  way computes other bits;
* every parameter and buffer: its name, dtype and shape, and a sample of its values
  (:data:`SAMPLES_PER_TENSOR` elements evenly spaced over the flattened tensor, first and last
  included).

Why a sample and not every byte: hashing all of a 70B model's weights takes minutes at start-up
and reads the whole of GPU memory back to the host; the sample costs one small gather per
tensor (well under a second on a big model). Two different checkpoints (another seed, a
fine-tune, another revision) differ in practically every element, so a sample of each tensor
tells them apart; what it does not catch is an edit confined to elements between the sampled
ones, which is a deliberate tamper, not a deployment mistake. It is a consistency check, not
a security feature.
"""

from __future__ import annotations

import hashlib
from typing import Any

import orjson
import torch
from torch import nn

__all__ = ["SAMPLES_PER_TENSOR", "local_shard", "model_fingerprint"]

SAMPLES_PER_TENSOR = 256

# Config keys that record where or how a checkpoint was saved, not what it computes.
_VOLATILE_CONFIG_KEYS = frozenset(
    {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "_commit_hash", "name_or_path"}
)


def _config_summary(config: Any) -> dict[str, Any]:
    to_dict = getattr(config, "to_dict", None)
    raw = to_dict() if callable(to_dict) else dict(vars(config))
    summary = {k: v for k, v in raw.items() if k not in _VOLATILE_CONFIG_KEYS}
    summary["__attn_implementation"] = getattr(config, "_attn_implementation", None)
    return summary


def local_shard(tensor: torch.Tensor) -> torch.Tensor:
    """This process's part of a (possibly tensor-parallel) parameter: a DTensor's local shard, else the tensor."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor


def _sample(tensor: torch.Tensor, count: int) -> bytes:
    """``count`` elements evenly spaced over the flattened tensor (all of a small one), as bytes.

    A tensor-parallel weight (a DTensor) is sampled from this rank's shard, the same on every
    server of the same mode. A weight offloaded to disk by a device map (on the meta device
    here) has no data to sample: its name, dtype and shape still count.
    """
    tensor = local_shard(tensor)
    if tensor.device.type == "meta":
        return b""
    flat = tensor.detach().reshape(-1)
    n = flat.numel()
    if n > count:
        index = torch.linspace(0, n - 1, count, device=flat.device).round().long()
        flat = flat.index_select(0, index)
    host = flat.to("cpu").contiguous()
    if host.dtype == torch.bool:
        host = host.to(torch.uint8)
    return host.view(torch.uint8).numpy().tobytes()


@torch.no_grad()
def model_fingerprint(
    model: nn.Module,
    *,
    dtype: torch.dtype,
    aux_layer_ids: list[int],
    mode: str = "single",
) -> str:
    """``"sha256:<hex>"`` of the config, the loaded dtype, the aux layers, the mode and the sampled weights."""
    digest = hashlib.sha256()
    head = {
        "config": _config_summary(getattr(model, "config", {})),
        "dtype": str(dtype).removeprefix("torch."),
        "aux_layer_ids": [int(i) for i in aux_layer_ids],
        "mode": mode,
        "samples_per_tensor": SAMPLES_PER_TENSOR,
    }
    digest.update(orjson.dumps(head, default=str, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS))
    for kind, named in (("param", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, tensor in named:
            shape = ",".join(str(d) for d in tensor.shape)
            digest.update(f"\n{kind} {name} {str(tensor.dtype).removeprefix('torch.')} [{shape}]\n".encode())
            digest.update(_sample(tensor, SAMPLES_PER_TENSOR))
    return "sha256:" + digest.hexdigest()
