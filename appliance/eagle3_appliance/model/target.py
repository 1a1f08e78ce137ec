"""The forward step: a frozen causal LM with hooks on its three aux layers (protocol §1.1-3).

No web framework and no projection here: :meth:`Target.forward` runs the model once and
returns what it captured (:class:`ForwardOutputs`); :mod:`eagle3_appliance.model.supervision`
turns that into the answer. Loading a checkpoint is :mod:`eagle3_appliance.model.loading`.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol

import torch
from torch import nn

from eagle3_appliance.core.inputs import Allocator, Packing
from eagle3_appliance.model.fingerprint import local_shard, model_fingerprint
from eagle3_appliance.model.head_slices import MIN_SLICE_ROWS, LogitSlices, deferred_head
from eagle3_appliance.model.outputs import ForwardOutputs
from eagle3_appliance.model.packing import flash_attention, packed_forward_inputs, packing_refusal
from eagle3_appliance.model.pooled_head import pooled_logits
from eagle3_client.protocol import default_aux_layer_ids, validate_aux_layer_ids

__all__ = ["ForwardOutputs", "Lockstep", "Target", "find_decoder_layers"]

# Config attributes that put a transformation between the LM head and the logits (their
# neutral value, where one exists). With any of them the "hidden" encoding would give the
# wrong distribution.
_LOGIT_TRANSFORMS: dict[str, float | None] = {
    "final_logit_softcapping": None,  # Gemma 2/3: tanh soft-capping
    "logit_scale": 1.0,  # Cohere
    "logits_scaling": 1.0,  # Granite (logits are divided by it)
    "output_multiplier_scale": 1.0,
}


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


class Lockstep(Protocol):
    """The other ranks of a tensor-parallel target (``model.tensor_parallel.TensorParallelGroup``).

    Every forward of this rank must be mirrored by every other rank, in the same order, or
    the collectives inside the forward never complete.
    """

    def step(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        capture_hidden: bool,
        packing: Packing | None = None,
        vision: Mapping[str, torch.Tensor] | None = None,
        vlm_capture: str | None = None,
    ) -> AbstractContextManager[None]:
        """Start the same forward on every other rank; the block runs this rank's own.

        ``vision``: the request's vision tensors, passed to every rank's forward. ``vlm_capture``:
        the ViSpec or MSD capture kind whose call (:mod:`eagle3_appliance.model.vlm`) every rank
        makes instead of :meth:`Target.forward`."""
        ...

    def faults(self) -> list[str]:
        """Why the group can no longer compute (a rank died or hangs); empty while it can."""
        ...


class Target:
    """A loaded, frozen causal LM with forward hooks on its three aux layers.

    Not re-entrant: the hooks write into one capture slot, so callers must run
    :meth:`forward` one at a time (the server does, through a one-thread executor).

    ``mode`` names how the loader placed the model (``"single"``: one device); it feeds the
    :attr:`fingerprint`, because the same weights placed another way may compute other bits.
    """

    def __init__(
        self,
        model: nn.Module,
        aux_layer_ids: Sequence[int] | None = None,
        name: str = "",
        *,
        mode: str = "single",
        lockstep: Lockstep | None = None,
    ) -> None:
        # A transformers model: its methods (get_input_embeddings, ...) are not on nn.Module's type.
        self.model: Any = model.eval().requires_grad_(False)
        self.name = name
        # How the weights are placed: "single", "device_map" or "tp=N" (/model_info and /metrics say it).
        self.mode = mode
        self.lockstep = lockstep
        # Tensor parallel: the input embedding is sharded by vocabulary; this is the whole of it.
        self.gathered_input_embeddings: torch.Tensor | None = None
        self.gathered_lm_head: torch.Tensor | None = None  # likewise the LM head (DFlash clients fetch it)
        self._fingerprint: str | None = None
        self.layers = find_decoder_layers(model)
        num_layers = self.num_hidden_layers
        # Why EAGLE-3 is not served (None: it is). Only when no aux ids were given and the defaults
        # do not fit a shallow model: the server still serves every other capture, and refuses an
        # EAGLE-3 client with this reason instead of failing to start (explicit ids still must fit).
        self.eagle3_refusal: str | None = None
        if aux_layer_ids is not None:
            self.aux_layer_ids = validate_aux_layer_ids(list(aux_layer_ids), num_layers)
        else:
            try:
                self.aux_layer_ids = default_aux_layer_ids(num_layers)
            except ValueError as exc:
                self.aux_layer_ids = []
                self.eagle3_refusal = f"{exc} (start the appliance with --aux-layer-ids to serve EAGLE-3)"
        self._captured: dict[int, torch.Tensor] = {}
        for layer_id in self.aux_layer_ids:
            self.layers[layer_id].register_forward_hook(self._capture_hook(layer_id))
        params = inspect.signature(model.forward).parameters
        self._forward_flags = {
            flag: False for flag in ("output_hidden_states", "output_attentions", "use_cache") if flag in params
        }
        self._hidden_refusal: tuple[str | None] | None = None  # cached (reason,) once probed
        self._slicing_refusal: tuple[str | None] | None = None  # likewise
        offloaded = hasattr(model, "_hf_hook")  # a device map's offloaded weights are read back per forward
        for p in self.model.parameters():
            if p.device.type == "meta" and not offloaded:
                raise RuntimeError("model has parameters on the meta device after loading")

    def clear_captures(self) -> None:
        """Drop what the aux-layer hooks kept (a forward not run by :meth:`forward`, a VLM capture's)."""
        self._captured.clear()

    def _capture_hook(self, layer_id: int) -> Callable[[nn.Module, Any, Any], None]:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            self._captured[layer_id] = output[0] if isinstance(output, tuple) else output

        return hook

    # -- shape and identity ------------------------------------------------------------

    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def num_hidden_layers(self) -> int:
        text_config = getattr(self.config, "text_config", None)
        if text_config is not None and getattr(text_config, "num_hidden_layers", None) is not None:
            return int(text_config.num_hidden_layers)
        return len(self.layers)

    def _embedding_weight(self) -> torch.Tensor:
        embedding: Any = self.model.get_input_embeddings()
        weight: torch.Tensor = embedding.weight
        return weight

    @property
    def input_embeddings(self) -> torch.Tensor:
        """The whole input embedding (a tensor-parallel target keeps a gathered copy on the host)."""
        if self.gathered_input_embeddings is not None:
            return self.gathered_input_embeddings
        return self._embedding_weight()

    def faults(self) -> list[str]:
        """Why this target can no longer compute (a tensor-parallel rank failed); empty while it can."""
        return self.lockstep.faults() if self.lockstep is not None else []

    @property
    def lm_head(self) -> nn.Module | None:
        head: nn.Module | None = self.model.get_output_embeddings()
        return head

    @property
    def device(self) -> torch.device:
        """Where the inputs go and the outputs come back (a tensor-parallel rank: its own device)."""
        device: torch.device = local_shard(self._embedding_weight()).device
        return device

    @property
    def dtype(self) -> torch.dtype:
        return self._embedding_weight().dtype

    @property
    def vocab_size(self) -> int:
        """Rows of the input embedding: token ids must lie in ``[0, vocab_size)``."""
        return int(self._embedding_weight().shape[0])

    @property
    def logits_size(self) -> int:
        """Width of the logits: the length of ``selected_token_mask``."""
        head = self.lm_head
        weight = getattr(head, "weight", None)
        return int(weight.shape[0]) if isinstance(weight, torch.Tensor) else self.vocab_size

    @property
    def hidden_size(self) -> int:
        return int(self._embedding_weight().shape[1])

    @property
    def fingerprint(self) -> str:
        """What this target computes, as one string (:mod:`eagle3_appliance.model.fingerprint`); computed once."""
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(
                self.model, dtype=self.dtype, aux_layer_ids=list(self.aux_layer_ids), mode=self.mode
            )
        return self._fingerprint

    def model_info(self) -> dict[str, Any]:
        """The body of ``/model_info`` (exactly upstream's keys)."""
        text_config = getattr(self.config, "text_config", None) or self.config
        return {
            "num_hidden_layers": self.num_hidden_layers,
            "hidden_size": int(getattr(text_config, "hidden_size", self.hidden_size)),
            "vocab_size": int(getattr(text_config, "vocab_size", self.vocab_size)),
            "aux_layer_ids": list(self.aux_layer_ids),
        }

    # -- the forward -------------------------------------------------------------------

    @torch.no_grad()
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        *,
        capture_hidden: bool = False,
        alloc: Allocator | None = None,
        packing: Packing | None = None,
        slice_rows: int | None = None,
        vision: Mapping[str, torch.Tensor] | None = None,
    ) -> ForwardOutputs:
        """One target forward on the model's device; the aux states, logits and (if asked) the LM head's input.

        ``alloc(shape, dtype)``, if given, supplies the memory the aux states are written to,
        and on the CPU the logits' too (:mod:`eagle3_appliance.model.pooled_head`).
        ``packing``: the rows hold several documents, run as the co-located packed path does
        (:mod:`eagle3_appliance.model.packing`). ``slice_rows``: the LM head is not run in the
        forward but over slices of this many rows when the logits are read
        (:mod:`eagle3_appliance.model.head_slices`; ignored for a head that cannot be sliced).
        ``vision``: a DSpark request's vision tensors, passed to the model's forward by name as
        upstream's ``HFDSparkTargetModel`` passes its ``mm_kwargs`` (never with ``packing``; a
        tensor-parallel target's other ranks are sent them too).
        """
        if vision and packing is not None:
            raise ValueError("vision inputs do not run with packed rows")
        self._captured.clear()
        mask, extra = packed_forward_inputs(self.model, input_ids, attention_mask, packing)
        # A sharded (tensor-parallel) or offloaded (device-map) head keeps its own forward.
        head = self.lm_head if self.lockstep is None and not hasattr(self.model, "_hf_hook") else None
        sliced = self._sliceable_head() if slice_rows else None
        try:
            with contextlib.ExitStack() as stack:
                slot = stack.enter_context(self._capture_lm_head_input(capture_hidden and sliced is None))
                stack.enter_context(self.lockstep_step(input_ids, attention_mask, capture_hidden, packing, vision))
                if sliced is None:
                    stack.enter_context(pooled_logits(head, alloc))
                else:
                    slot = stack.enter_context(deferred_head(sliced))
                out = self.model(
                    input_ids=input_ids, attention_mask=mask, **extra, **(vision or {}), **self._forward_flags
                )
            if sorted(self._captured) != sorted(self.aux_layer_ids):
                raise RuntimeError(f"captured {sorted(self._captured)} instead of layers {self.aux_layer_ids}")
            logits = out.logits if hasattr(out, "logits") else out
            # With a device map the aux layers may sit on other devices: gathered where the logits are.
            parts = [self._captured[i].to(logits.device) for i in self.aux_layer_ids]
            if not parts:  # no EAGLE-3 aux layers (eagle3_refusal): the other captures read no aux
                aux = torch.empty((*input_ids.shape, 0), dtype=self.dtype, device=logits.device)
            elif alloc is None:
                aux = torch.cat(parts, dim=-1)
            else:
                shape = (*parts[0].shape[:-1], sum(p.shape[-1] for p in parts))
                aux = torch.cat(parts, dim=-1, out=alloc(shape, parts[0].dtype))
        finally:
            self._captured.clear()
        hidden = slot.get("h")
        if (capture_hidden or sliced is not None) and (hidden is None or hidden.shape[:-1] != logits.shape[:-1]):
            raise RuntimeError("the LM head's input was not captured for every position")
        if sliced is not None:
            assert hidden is not None and slice_rows is not None
            head_slices = LogitSlices(hidden, sliced.weight, slice_rows, alloc)
            return ForwardOutputs(aux, None, hidden if capture_hidden else None, head_slices)
        return ForwardOutputs(aux, logits, hidden)

    def _sliceable_head(self) -> nn.Linear | None:
        """The LM head if it can run over slices: a plain bias-free ``nn.Linear`` this process holds whole."""
        head = self.lm_head
        if self.lockstep is not None or hasattr(self.model, "_hf_hook"):
            return None
        if type(head) is not nn.Linear or head.bias is not None or hasattr(head, "_hf_hook") or "forward" in vars(head):
            return None
        weight = head.weight
        if not isinstance(weight, torch.Tensor) or weight.is_quantized or weight.device.type == "meta":
            return None
        return head

    def slicing_refusal(self) -> str | None:
        """Why the LM head cannot run over slices of the sequence, or None when it can (cached).

        A probe forward checks, bit for bit, that sliced logits (the shortest slices the server
        makes) equal the model's own: this catches a transformation after the head and a kernel
        that sums short slices in another order. Runs forwards: call it on the model thread.
        """
        if self._slicing_refusal is None:
            reason = None
            if self._sliceable_head() is None:
                reason = "the LM head is not a plain bias-free nn.Linear held whole by this process"
            else:
                ids = (torch.arange(2 * (3 * MIN_SLICE_ROWS + 5), device=self.device) % self.vocab_size).view(2, -1)
                whole = self.forward(ids, torch.ones_like(ids)).full_logits()
                sliced = self.forward(ids, torch.ones_like(ids), slice_rows=MIN_SLICE_ROWS).full_logits()
                if whole.dtype != sliced.dtype or whole.shape != sliced.shape or not torch.equal(whole, sliced):
                    reason = "the LM head's output on slices of the sequence differs from the model's logits"
            self._slicing_refusal = (reason,)
        return self._slicing_refusal[0]

    def lockstep_step(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        capture_hidden: bool = False,
        packing: Packing | None = None,
        vision: Mapping[str, torch.Tensor] | None = None,
        vlm_capture: str | None = None,
    ) -> AbstractContextManager[None]:
        """The other ranks' share of this forward (:meth:`Lockstep.step`); nothing on one rank."""
        if self.lockstep is None:
            return contextlib.nullcontext()
        return self.lockstep.step(input_ids, attention_mask, capture_hidden, packing, vision, vlm_capture)

    def packing_refusal(self) -> str | None:
        """Why this target cannot run packed rows (the model's forward takes no ``position_ids``), or None."""
        return packing_refusal(self.model)

    @property
    def max_packed_rows(self) -> int | None:
        """Rows a packed forward may hold: 1 under FlashAttention (see :mod:`eagle3_appliance.model.packing`)."""
        return 1 if flash_attention(self.model) else None

    @contextlib.contextmanager
    def _capture_lm_head_input(self, enabled: bool) -> Iterator[dict[str, torch.Tensor]]:
        """A pre-hook on the LM head for one forward: ``slot["h"]`` is its input (what "hidden" sends).

        The LM head's input is taken after the final norm and any scaling the model applies
        before the head; without ``enabled`` no hook is installed (it costs nothing).
        """
        slot: dict[str, torch.Tensor] = {}
        head = self.lm_head if enabled else None
        if head is None:
            yield slot
            return

        def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
            slot["h"] = args[0]

        handle = head.register_forward_pre_hook(hook)
        try:
            yield slot
        finally:
            handle.remove()

    # -- what the "hidden" encoding needs ---------------------------------------------------

    def hidden_refusal(self) -> str | None:
        """Why the LM head's input cannot reproduce this model's logits, or None when it can (cached).

        Config checks give a named reason; a probe forward then checks, bit for bit, that the
        logits are exactly ``linear(lm_head_input, lm_head.weight)``, which also catches
        transformations no config attribute announces. Runs a forward: call it on the model thread.
        """
        if self._hidden_refusal is None:
            reason = self._static_hidden_refusal()
            if reason is None:
                reason = self._probe_hidden_refusal()
            self._hidden_refusal = (reason,)
        return self._hidden_refusal[0]

    def _static_hidden_refusal(self) -> str | None:
        if self.lockstep is not None:
            return f"the LM head is sharded over the ranks of a tensor-parallel target ({self.mode})"
        head = self.lm_head
        if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
            return "the model has no output embedding (LM head) weight"
        if getattr(head, "bias", None) is not None:
            return "the LM head has a bias"
        return self.logit_transform()

    def logit_transform(self) -> str | None:
        """The transformation the config puts between the LM head's output and the logits, named; None when none."""
        configs = [self.config, getattr(self.config, "text_config", None)]
        for config in (c for c in configs if c is not None):
            for attr, neutral in _LOGIT_TRANSFORMS.items():
                value = getattr(config, attr, None)
                if value is not None and value != neutral:
                    return f"the config sets {attr}={value}, a transformation after the LM head"
        return None

    def _probe_hidden_refusal(self) -> str | None:
        ids = (torch.arange(8, device=self.device) % self.vocab_size).unsqueeze(0)
        out = self.forward(ids, torch.ones_like(ids), capture_hidden=True)
        assert out.final_hidden is not None and out.logits is not None
        recomputed = torch.nn.functional.linear(out.final_hidden, self.lm_head_weight()).to(out.logits.dtype)
        if recomputed.shape != out.logits.shape or not torch.equal(recomputed, out.logits):
            return "the logits are not exactly linear(LM-head input, LM-head weight) (a transformation after the head)"
        return None

    def lm_head_weight(self) -> torch.Tensor:
        weight = getattr(self.lm_head, "weight", None)
        if not isinstance(weight, torch.Tensor):
            raise RuntimeError("the model has no output embedding (LM head) weight")
        return weight

    def lm_head_rows(self, selected_token_ids: torch.Tensor) -> torch.Tensor:
        """``lm_head.weight[selected_token_ids]`` ``[D,H]`` on the CPU, for a client on the "hidden" encoding."""
        weight = self.lm_head_weight()
        return weight.index_select(0, selected_token_ids.to(weight.device)).detach().to("cpu").contiguous()
