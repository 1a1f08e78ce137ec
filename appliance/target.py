"""The frozen target model: loading, aux-layer capture and the supervision (protocol §1).

No web framework here: this module is the math and the model, usable in-process (the
tests' reference runs exactly these steps) and called by the server off its event loop.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from appliance.builtin_model import ensure_builtin_model
from appliance.settings import Device, Dtype, Settings
from client.protocol import default_aux_layer_ids, validate_aux_layer_ids

__all__ = ["Target", "VocabMapping", "compute_supervision", "find_decoder_layers", "load_target", "shift_left"]

logger = logging.getLogger(__name__)


def find_decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers, searched in the protocol's order (§1.2)."""
    candidates = (
        ("model", "layers"),
        ("model", "language_model", "layers"),
        ("language_model", "layers"),
        ("layers",),
        ("transformer", "h"),
    )
    for names in candidates:
        obj: Any = model
        for name in names:
            obj = getattr(obj, name, None)
            if obj is None:
                break
        if obj is None:
            continue
        if isinstance(obj, nn.ModuleDict):
            return [obj[str(i)] for i in range(len(obj))]
        return list(obj)
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__} for aux-layer capture")


def shift_left(x: torch.Tensor) -> torch.Tensor:
    """``cat(x[:, 1:], zeros_like(x[:, :1]), dim=1)``: the next-token alignment of §1.4."""
    return torch.cat((x[:, 1:], torch.zeros_like(x[:, :1])), dim=1)


@dataclass(frozen=True)
class VocabMapping:
    """The draft vocabulary: ``selected_token_ids`` int64 ``[D]``, ``selected_token_mask`` bool ``[V]``."""

    selected_token_ids: torch.Tensor
    selected_token_mask: torch.Tensor

    @property
    def draft_vocab_size(self) -> int:
        return int(self.selected_token_ids.numel())


def compute_supervision(
    aux_hidden_states: torch.Tensor,
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    loss_mask: torch.Tensor,
    mapping: VocabMapping,
) -> dict[str, torch.Tensor]:
    """Project the target's logits onto the draft vocabulary (§1.4-5), bit-exactly.

    Equivalent, element for element, to shifting the full ``[B,T,V]`` logits first and
    then taking argmax / index_select / softmax, but without materialising a shifted copy
    of the full-vocabulary logits: argmax, gather and softmax act row by row, so computing
    them on unshifted rows and shifting the (much smaller) results gives the same bits.
    The zero tail row is reproduced explicitly: argmax of a zero row is 0 and its softmax
    is the softmax of zeros, computed by the same kernel.
    """
    ids = mapping.selected_token_ids.to(logits.device)
    token_mask = mapping.selected_token_mask.to(logits.device)
    shifted_loss_mask = shift_left(loss_mask)

    shifted_top = shift_left(logits.argmax(dim=-1))  # a zero logits row has argmax 0
    position_mask = (token_mask[shifted_top] & shifted_loss_mask.bool()).unsqueeze(-1)

    probs = torch.softmax(logits.index_select(-1, ids).float(), dim=-1)
    zero_row = torch.softmax(torch.zeros_like(logits[:, :1, :1]).expand(-1, -1, ids.numel()).float(), dim=-1)
    target_probs = torch.cat((probs[:, 1:], zero_row), dim=1)

    return {
        "aux_hidden_states": aux_hidden_states,
        "target_probs": target_probs,
        "position_mask": position_mask,
        "input_ids": shift_left(input_ids),
        "loss_mask": shifted_loss_mask,
    }


class Target:
    """A loaded, frozen causal LM with forward hooks on its three aux layers.

    Not re-entrant: the hooks write into one capture slot, so callers must run
    :meth:`forward` one at a time (the server does, through a one-thread executor).
    """

    def __init__(self, model: nn.Module, aux_layer_ids: list[int] | None = None, name: str = "") -> None:
        self.model = model.eval().requires_grad_(False)
        self.name = name
        self.layers = find_decoder_layers(model)
        num_layers = self.num_hidden_layers
        self.aux_layer_ids = (
            default_aux_layer_ids(num_layers)
            if aux_layer_ids is None
            else validate_aux_layer_ids(list(aux_layer_ids), num_layers)
        )
        self._captured: dict[int, torch.Tensor] = {}
        for layer_id in self.aux_layer_ids:
            self.layers[layer_id].register_forward_hook(self._capture_hook(layer_id))
        params = inspect.signature(model.forward).parameters
        self._forward_flags = {
            flag: False for flag in ("output_hidden_states", "output_attentions", "use_cache") if flag in params
        }
        for p in self.model.parameters():
            if p.device.type == "meta":
                raise RuntimeError("model has parameters on the meta device after loading")

    def _capture_hook(self, layer_id: int):  # noqa: ANN202 - torch hook signature
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            self._captured[layer_id] = output[0] if isinstance(output, tuple) else output

        return hook

    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def num_hidden_layers(self) -> int:
        text_config = getattr(self.config, "text_config", None)
        if text_config is not None and getattr(text_config, "num_hidden_layers", None) is not None:
            return int(text_config.num_hidden_layers)
        return len(self.layers)

    @property
    def device(self) -> torch.device:
        return self.input_embeddings.device

    @property
    def dtype(self) -> torch.dtype:
        return self.input_embeddings.dtype

    @property
    def input_embeddings(self) -> torch.Tensor:
        return self.model.get_input_embeddings().weight

    @property
    def vocab_size(self) -> int:
        """Rows of the input embedding: token ids must lie in ``[0, vocab_size)``."""
        return int(self.input_embeddings.shape[0])

    @property
    def logits_size(self) -> int:
        """Width of the logits: the length of ``selected_token_mask``."""
        out = self.model.get_output_embeddings()
        return int(out.weight.shape[0]) if out is not None else self.vocab_size

    @property
    def hidden_size(self) -> int:
        return int(self.input_embeddings.shape[1])

    def model_info(self) -> dict[str, Any]:
        """The body of ``/model_info`` (exactly upstream's keys)."""
        text_config = getattr(self.config, "text_config", None) or self.config
        return {
            "num_hidden_layers": self.num_hidden_layers,
            "hidden_size": int(getattr(text_config, "hidden_size", self.hidden_size)),
            "vocab_size": int(getattr(text_config, "vocab_size", self.vocab_size)),
            "aux_layer_ids": list(self.aux_layer_ids),
        }

    @torch.no_grad()
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        *,
        alloc: Callable[[Sequence[int], torch.dtype], torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One target forward: ``(aux_hidden_states [B,T,3H], logits [B,T,V])``, unshifted.

        ``alloc(shape, dtype)``, if given, supplies the memory the aux states are written to.
        """
        self._captured.clear()
        try:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, **self._forward_flags)
            if len(self._captured) != 3:
                raise RuntimeError(f"captured {sorted(self._captured)} instead of layers {self.aux_layer_ids}")
            parts = [self._captured[i] for i in self.aux_layer_ids]
            if alloc is None:
                aux = torch.cat(parts, dim=-1)
            else:
                shape = (*parts[0].shape[:-1], sum(p.shape[-1] for p in parts))
                aux = torch.cat(parts, dim=-1, out=alloc(shape, parts[0].dtype))
        finally:
            self._captured.clear()
        logits = out.logits if hasattr(out, "logits") else out
        return aux, logits

    @torch.no_grad()
    def supervise(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor, mapping: VocabMapping
    ) -> dict[str, torch.Tensor]:
        """Forward plus projection: the full ``/generate`` answer, keyed as the protocol says."""
        dev = self.device
        input_ids, attention_mask, loss_mask = (t.to(dev) for t in (input_ids, attention_mask, loss_mask))
        aux, logits = self.forward(input_ids, attention_mask)
        return compute_supervision(aux, logits, input_ids, loss_mask, mapping)


def resolve_device(device: Device) -> torch.device:
    if device is Device.auto:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device.value)


def resolve_dtype(dtype: Dtype, device: torch.device) -> torch.dtype:
    if dtype is Dtype.auto:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype.value)


def load_target(settings: Settings) -> Target:
    """Load ``settings.model`` (the built-in model, a local folder or a hub id) as a frozen Target."""
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
        model = model.to(device)
    aux = list(settings.aux_layer_ids) if settings.aux_layer_ids is not None else None
    return Target(model, aux, name=settings.model)
