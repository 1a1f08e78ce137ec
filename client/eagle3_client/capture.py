"""What a ``/generate`` asks the server to capture: one description for every draft family.

EAGLE-3 (upstream's protocol) captures the server's three aux layers and sends draft-vocabulary
supervision, shifted left, in the session's encoding. The DFlash family (DFlash, DFlash 2,
JetSpec, Domino) captures a layer set the recipe chooses (``target_layer_ids``, any number of
distinct layers), unshifted, and optionally the full-vocabulary logits ``[B,T,V]`` (JetSpec's
forward-KL). DSpark captures a strictly increasing layer set in which ``-1`` is the embedding
output and the last layer is the post-norm hidden state, plus the post-norm final hidden state
``[B,T,H]`` (upstream's ``HFDSparkTargetModel``). The vision-language kinds, ViSpec and MSD,
take no layers: the answer is the forward's embedding output (vision features spliced in), its
last hidden state and its logits, unshifted (``docs/vlm.md``); their requests may carry the
processor's vision tensors. EAGLE-1/EAGLE-2 (and ViSpec's text-only stage 1) take no layers
either: the answer is the post-norm last hidden state ``[B,T,H]`` and the LM head's output on it
``[B,T,V]``, unshifted (upstream's ``HFEagleTargetModel``, ``docs/eagle.md``). :class:`Capture`
says which, and both ends read it from here: the client puts it in its ``POST /session`` offer,
the server checks it against its model once, keeps it on the session and answers every
``/generate`` of that session with it.

An unmodified upstream peer never sees one: the EAGLE-3 capture is the absence of the field
(the offer and the reply stay byte-for-byte what they were), and our client refuses to send a
DFlash request to a server that did not echo the capture (an upstream server answers
``/session`` 404, an older appliance ignores the field).

Usage::

    capture = Capture.dflash([1, 3, 5, 6, 7], logits=True)   # or Capture.dspark([-1, 3, 7])
    offer_body["capture"] = capture.to_json()
    capture.checked(num_layers=8)          # ValueError naming the problem
    capture.keys                           # ("hidden_states", "logits"): the answer's wire keys
    Capture.parse("dflash+logits:1,3,5")   # the command-line spelling (load tests, sizes)
    Capture.parse("dspark:-1,3,7")
    Capture.parse("vispec"), Capture.parse("msd"), Capture.parse("eagle")
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from eagle3_client.errors import ProtocolViolation
from eagle3_client.quoting import quote

__all__ = [
    "dflash_batch_type",
    "dspark_batch",
    "dspark_batch_type",
    "eagle_batch_type",
    "msd_batch",
    "msd_batch_type",
    "shift_left",
    "vispec_batch",
    "vispec_batch_type",
    "CAPTURE_DFLASH",
    "CAPTURE_DSPARK",
    "CAPTURE_EAGLE",
    "CAPTURE_EAGLE3",
    "CAPTURE_KINDS",
    "CAPTURE_MSD",
    "CAPTURE_VISPEC",
    "DSPARK_FEATURES",
    "EAGLE3",
    "EAGLE_KEYS",
    "KEY_HIDDEN_STATES",
    "KEY_INPUTS_EMBEDS",
    "KEY_LAST_HIDDEN_STATES",
    "KEY_LOGITS",
    "MAX_VISION_INPUTS",
    "VLM_KEYS",
    "MAX_CAPTURE_LAYERS",
    "OFFER_KEY",
    "Capture",
]

CAPTURE_EAGLE3 = "eagle3"  # the server's aux layers, draft-vocabulary supervision (upstream)
CAPTURE_DFLASH = "dflash"  # a chosen layer set, unshifted, full logits optional
CAPTURE_DSPARK = "dspark"  # a layer set (-1: the embedding output; last: post-norm), plus the post-norm state
# Vision-language targets (docs/vlm.md): upstream's HFVispecTargetModel and HFMSDTargetModel.
CAPTURE_VISPEC = "vispec"  # the base model's hidden_states[0] and [-1], lm_head(last)
CAPTURE_MSD = "msd"  # the language backbone's inputs_embeds, the full forward's last state and logits
CAPTURE_VLM = (CAPTURE_VISPEC, CAPTURE_MSD)
# EAGLE-1/EAGLE-2 and ViSpec stage 1 (upstream's HFEagleTargetModel): the post-norm last hidden state, lm_head of it
CAPTURE_EAGLE = "eagle"
CAPTURE_KINDS = (CAPTURE_EAGLE3, CAPTURE_DFLASH, CAPTURE_DSPARK, *CAPTURE_VLM, CAPTURE_EAGLE)
# The key of the capture object in the /session offer and reply.
OFFER_KEY = "capture"
# The answer of a DFlash capture, in wire order: cat(layer outputs) [B,T,n*H] in the model
# dtype, then (only when asked) the LM head's logits [B,T,V] as the model returns them.
KEY_HIDDEN_STATES = "hidden_states"
KEY_LOGITS = "logits"
# The answer of a DSpark capture, in wire order: cat(features) [B,T,n*H], then the final norm's
# output [B,T,H] (upstream's ``target_last_hidden_states``), both in the model dtype.
KEY_LAST_HIDDEN_STATES = "last_hidden_states"
# The answer of a ViSpec or MSD capture, in wire order, all unshifted and in the model dtype:
# the embedding output with the vision features spliced in [B,T,H], the last hidden state
# [B,T,H] and the logits [B,T,V]. The client shifts them as the co-located wrapper does.
KEY_INPUTS_EMBEDS = "inputs_embeds"
VLM_KEYS = (KEY_INPUTS_EMBEDS, KEY_HIDDEN_STATES, KEY_LOGITS)
# The answer of an EAGLE-1/2 capture, in wire order, unshifted and in the model dtype: the final
# norm's output [B,T,H] (the base model's last hidden state) and the LM head's output on it [B,T,V].
EAGLE_KEYS = (KEY_LAST_HIDDEN_STATES, KEY_LOGITS)
# Vision tensors one request may carry beside its ids and masks (the wire body's entry bound
# is the server's MAX_BODY_ENTRIES: 3 + this).
MAX_VISION_INPUTS = 8
# A DSpark answer's tensors by the names of upstream's stream schema (FeatureAlgorithm.DSPARK),
# each with its wire key: what a stream's reference names and a consumer's store returns.
DSPARK_FEATURES = {"target_hidden_states": KEY_HIDDEN_STATES, "target_last_hidden_states": KEY_LAST_HIDDEN_STATES}
# More layers than any model has would only be a way to make the server allocate: a bound
# checked before the model's own depth is.
MAX_CAPTURE_LAYERS = 1024


@dataclass(frozen=True)
class Capture:
    """Which layers a ``/generate`` captures and which supervision it sends.

    ``kind`` is ``"eagle3"`` (``layers`` empty: the server's aux layers; supervision in the
    session's encoding) or ``"dflash"`` (``layers``: the decoder layers whose outputs are
    concatenated, in this order; ``logits``: also send the full-vocabulary logits) or ``"dspark"``
    (``layers``: strictly increasing, ``-1`` the embedding output, the last layer the final
    norm's output; the answer also carries the final norm's output on its own; no logits) or
    ``"vispec"`` / ``"msd"`` (no layers, no logits flag: a vision-language target's embedding
    output, last hidden state and logits, :data:`VLM_KEYS`) or ``"eagle"`` (no layers, no logits
    flag: the post-norm last hidden state and its logits, :data:`EAGLE_KEYS`).
    """

    kind: str = CAPTURE_EAGLE3
    layers: tuple[int, ...] = ()
    logits: bool = False

    @classmethod
    def dflash(cls, layers: Sequence[int], *, logits: bool = False) -> Capture:
        return cls(CAPTURE_DFLASH, tuple(int(i) for i in layers), bool(logits))

    @classmethod
    def dspark(cls, layers: Sequence[int]) -> Capture:
        return cls(CAPTURE_DSPARK, tuple(int(i) for i in layers), False)

    @classmethod
    def vispec(cls) -> Capture:
        return cls(CAPTURE_VISPEC)

    @classmethod
    def msd(cls) -> Capture:
        return cls(CAPTURE_MSD)

    @classmethod
    def eagle(cls) -> Capture:
        return cls(CAPTURE_EAGLE)

    @property
    def is_vlm(self) -> bool:
        """ViSpec or MSD: a vision-language target's forward, whose requests may carry vision tensors."""
        return self.kind in CAPTURE_VLM

    @property
    def takes_vision(self) -> bool:
        """ViSpec, MSD or DSpark: a request may carry vision tensors for the target's forward (docs/vlm.md)."""
        return self.is_vlm or self.is_dspark

    @property
    def is_eagle3(self) -> bool:
        return self.kind == CAPTURE_EAGLE3

    @property
    def is_dspark(self) -> bool:
        return self.kind == CAPTURE_DSPARK

    @property
    def is_eagle(self) -> bool:
        """EAGLE-1/EAGLE-2 (not EAGLE-3): the last hidden state and its logits."""
        return self.kind == CAPTURE_EAGLE

    @property
    def takes_layers(self) -> bool:
        """DFlash or DSpark: the capture names the layers it sends."""
        return self.kind in (CAPTURE_DFLASH, CAPTURE_DSPARK)

    @property
    def algorithm(self) -> str:
        """Upstream's ``FeatureAlgorithm`` value of a stream of these answers (``SampleRef.algorithm``):
        one per kind, so that a DSpark sample is never read as a DFlash one (their ``hidden_states``
        differ: DSpark's ``-1`` and last layer are the embedding output and the post-norm state)."""
        return self.kind

    @property
    def label(self) -> str:
        """How metrics and logs name it: ``eagle3``, ``dflash``, ``dflash+logits``, ``dspark``, ``vispec``,
        ``msd`` or ``eagle``."""
        return f"{self.kind}+logits" if self.logits else self.kind

    @property
    def named(self) -> str:
        """How messages name it: ``the dspark capture of layers [-1, 3]``, ``the eagle capture``."""
        layers = f" of layers {list(self.layers)}" if self.takes_layers else ""
        return f"the {self.label} capture{layers}"

    @property
    def keys(self) -> tuple[str, ...]:
        """The wire keys of a non-EAGLE-3 answer, in order (EAGLE-3's come from the encoding)."""
        if self.is_eagle:
            return EAGLE_KEYS
        if self.is_dspark:
            return (KEY_HIDDEN_STATES, KEY_LAST_HIDDEN_STATES)
        if self.is_vlm:
            return VLM_KEYS
        return (KEY_HIDDEN_STATES, KEY_LOGITS) if self.logits else (KEY_HIDDEN_STATES,)

    def checked(self, num_layers: int) -> Capture:
        """This capture if a model of ``num_layers`` decoder layers can serve it; ValueError naming why not."""
        if not self.takes_layers:
            return self
        if not self.layers:
            raise ValueError("capture.layers must name at least one decoder layer")
        if self.is_dspark:
            return self._checked_dspark(num_layers)
        for i in self.layers:
            if not 0 <= i < num_layers:
                raise ValueError(f"capture.layers: layer id {i} is out of range for a model with {num_layers} layers")
        repeated = sorted({i for i in self.layers if self.layers.count(i) > 1})
        if repeated:
            raise ValueError(f"capture.layers lists layer id(s) {repeated} more than once; each layer may appear once")
        return self

    def _checked_dspark(self, num_layers: int) -> Capture:
        """DSpark's layer ids, checked as upstream's ``validate_target_layer_ids`` does."""
        bad = [i for i in self.layers if not (i == -1 or 0 <= i < num_layers)]
        if bad:
            raise ValueError(
                f"capture.layers: DSpark layer id(s) {bad} are out of range {{-1}} U [0, {num_layers - 1}] "
                f"for a model with {num_layers} layers (-1 is the embedding output)"
            )
        unordered = [b for a, b in zip(self.layers, self.layers[1:], strict=False) if b <= a]
        if unordered:
            raise ValueError(
                f"capture.layers: DSpark layer ids must be strictly increasing; {unordered} "
                f"do not follow the id before them in {list(self.layers)}"
            )
        return self

    @property
    def spec(self) -> str:
        """The command-line spelling :meth:`parse` reads: ``eagle3``, ``dflash:1,3,5``, ``dflash+logits:1,3,5``,
        ``dspark:-1,3,7``, ``vispec``, ``msd``, ``eagle``."""
        return f"{self.label}:{','.join(str(i) for i in self.layers)}" if self.takes_layers else self.kind

    @classmethod
    def parse(cls, text: str) -> Capture:
        """A capture from its command-line spelling (see :attr:`spec`); ValueError naming what is wrong."""
        text = text.strip()
        if text == CAPTURE_EAGLE3:
            return EAGLE3
        if text in (*CAPTURE_VLM, CAPTURE_EAGLE):
            return cls(text)
        head, _, tail = text.partition(":")
        if head not in (CAPTURE_DFLASH, f"{CAPTURE_DFLASH}+logits", CAPTURE_DSPARK) or not tail.strip():
            raise ValueError(
                "a capture is 'eagle3', 'dflash:L1,L2,...', 'dflash+logits:L1,L2,...', 'dspark:L1,L2,...', "
                "'vispec', 'msd' or 'eagle', "
                f"got {quote(text)}"
            )
        try:
            layers = [int(part) for part in tail.split(",")]
        except ValueError:
            raise ValueError(f"the layers of capture {quote(text)} must be integers separated by commas") from None
        if head == CAPTURE_DSPARK:
            return cls.dspark(layers)
        return cls.dflash(layers, logits=head.endswith("+logits"))

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "layers": list(self.layers), "logits": self.logits}

    @classmethod
    def from_json(cls, body: Any) -> Capture:
        """Read a capture object; ValueError naming the field (the server answers 422 with it)."""
        if not isinstance(body, Mapping):
            raise ValueError(f"capture must be a JSON object, got {type(body).__name__}")
        kind = body.get("kind", CAPTURE_EAGLE3)
        if kind not in CAPTURE_KINDS:
            raise ValueError(f"capture.kind must be one of {list(CAPTURE_KINDS)}, got {quote(kind)}")
        layers = body.get("layers", [])
        if not isinstance(layers, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
            raise ValueError(f"capture.layers must be a list of integers, got {quote(layers)}")
        if len(layers) > MAX_CAPTURE_LAYERS:
            raise ValueError(f"capture.layers has {len(layers)} entries; at most {MAX_CAPTURE_LAYERS}")
        logits = body.get("logits", False)
        if not isinstance(logits, bool):
            raise ValueError(f"capture.logits must be true or false, got {quote(logits)}")
        if kind == CAPTURE_EAGLE3 and (layers or logits):
            raise ValueError("an eagle3 capture takes no layers or logits: it uses the server's aux layers")
        if kind in CAPTURE_VLM and (layers or logits):
            raise ValueError(
                f"a {kind} capture takes no layers or logits: "
                "it sends the embedding output, the last hidden state and the logits"
            )
        if kind == CAPTURE_EAGLE and (layers or logits):
            raise ValueError(
                "an eagle capture takes no layers or logits: it sends the last hidden state and its logits"
            )
        if kind == CAPTURE_DSPARK and logits:
            raise ValueError("a dspark capture takes no logits: it sends the final norm's output instead")
        return cls(kind, tuple(layers), logits)


EAGLE3 = Capture()


def _upstream_or_local(module: str, name: str, local: type) -> type:
    """Upstream's batch type ``module.name`` when it imports, else ``local`` (the same fields)."""
    try:
        found: type = getattr(importlib.import_module(module), name)
    except Exception:  # noqa: BLE001 - absent or half-installed AutoModel: the local type has the same fields
        return local
    return found


@dataclass
class _LocalDFlashTargetBatch:
    """The fields of upstream's ``DFlashTargetBatch`` (used when NeMo AutoModel is not installed)."""

    hidden_states: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor
    logits: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None
    seq_lens: torch.Tensor | None = None
    doc_remaining: torch.Tensor | None = None


@functools.cache
def dflash_batch_type() -> type:
    """Upstream's ``DFlashTargetBatch`` when it imports, else the local equivalent (imported on first use)."""
    return _upstream_or_local(
        "nemo_automodel.components.speculative.dflash.target", "DFlashTargetBatch", _LocalDFlashTargetBatch
    )


@dataclass
class _LocalDSparkTargetBatch:
    """The fields of upstream's ``DSparkTargetBatch`` (used when NeMo AutoModel is not installed)."""

    target_hidden_states: torch.Tensor
    target_last_hidden_states: torch.Tensor
    input_ids: torch.Tensor
    loss_mask: torch.Tensor
    position_ids: torch.Tensor | None = None
    seq_lens: torch.Tensor | None = None
    doc_remaining: torch.Tensor | None = None


@functools.cache
def dspark_batch_type() -> type:
    """Upstream's ``DSparkTargetBatch`` when it imports, else the local equivalent (imported on first use)."""
    return _upstream_or_local(
        "nemo_automodel.components.speculative.dspark.target", "DSparkTargetBatch", _LocalDSparkTargetBatch
    )


@dataclass
class _LocalVispecTargetBatch:
    """The fields of upstream's ``VispecTargetBatch`` (used when NeMo AutoModel is not installed)."""

    inputs_embeds: torch.Tensor
    input_hidden_states: torch.Tensor
    target_logits: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor
    image_mask: torch.Tensor


@dataclass
class _LocalMSDTargetBatch:
    """The fields of upstream's ``MSDTargetBatch`` (used when NeMo AutoModel is not installed)."""

    inputs_embeds: torch.Tensor
    input_hidden_states: torch.Tensor
    target_hidden_states: torch.Tensor
    target_logits: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor
    image_mask: torch.Tensor


@dataclass
class _LocalEagleTargetBatch:
    """The fields of upstream's ``EagleTargetBatch`` (used when NeMo AutoModel is not installed)."""

    input_hidden_states: torch.Tensor
    target_hidden_states: torch.Tensor
    target_logits: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor
    position_ids: torch.Tensor | None = None
    seq_lens: torch.Tensor | None = None
    doc_remaining: torch.Tensor | None = None


@functools.cache
def eagle_batch_type() -> type:
    """Upstream's ``EagleTargetBatch`` (EAGLE-1/2) when it imports, else the local equivalent (imported on use)."""
    return _upstream_or_local(
        "nemo_automodel.components.speculative.eagle.target_v12", "EagleTargetBatch", _LocalEagleTargetBatch
    )


@functools.cache
def vispec_batch_type() -> type:
    """Upstream's ``VispecTargetBatch`` when it imports, else the local equivalent (imported on first use)."""
    return _upstream_or_local(
        "nemo_automodel.components.speculative.eagle.vispec_target", "VispecTargetBatch", _LocalVispecTargetBatch
    )


@functools.cache
def msd_batch_type() -> type:
    """Upstream's ``MSDTargetBatch`` when it imports, else the local equivalent (imported on first use)."""
    return _upstream_or_local(
        "nemo_automodel.components.speculative.eagle.msd_target", "MSDTargetBatch", _LocalMSDTargetBatch
    )


def dspark_batch(
    hidden: torch.Tensor | None,
    last: torch.Tensor | None,
    input_ids: torch.Tensor,
    loss_mask: torch.Tensor,
    packing: Mapping[str, torch.Tensor] | None,
    device: torch.device,
) -> Any:
    """Upstream's ``DSparkTargetBatch`` from a DSpark answer (``hidden_states``, ``last_hidden_states``)
    and its request, on ``device``.

    One builder for the answer of a ``/generate`` and for a stream's kept answer, so that both
    are the same batch; :class:`ProtocolViolation` when the answer does not fit the request.
    """
    if hidden is None or last is None or hidden.shape[:2] != input_ids.shape or last.shape[:2] != input_ids.shape:
        raise ProtocolViolation(
            f"a DSpark answer has {KEY_HIDDEN_STATES} {None if hidden is None else list(hidden.shape)} and "
            f"{KEY_LAST_HIDDEN_STATES} {None if last is None else list(last.shape)} "
            f"for a batch of {list(input_ids.shape)}"
        )
    return dspark_batch_type()(
        target_hidden_states=hidden.to(device),
        target_last_hidden_states=last.to(device),
        input_ids=input_ids.to(device),
        loss_mask=loss_mask.to(device),
        **{key: t.to(device) for key, t in (packing or {}).items()},
    )


def shift_left(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` ``[B,T,...]`` one position left along T, the last position zero (the VLM wrappers' alignment)."""
    return torch.cat((tensor[:, 1:], torch.zeros_like(tensor[:, :1])), dim=1)


def _vlm_answer(
    answer: Mapping[str, torch.Tensor], input_ids: torch.Tensor, device: torch.device, label: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A ViSpec or MSD answer's three tensors (:data:`VLM_KEYS`) on ``device``, checked against the batch."""
    parts = [answer.get(key) for key in VLM_KEYS]
    if any(t is None or t.ndim != 3 or t.shape[:2] != input_ids.shape for t in parts):
        shapes = {k: list(v.shape) for k, v in answer.items()}
        raise ProtocolViolation(f"a {label} answer has {shapes} for a batch of {list(input_ids.shape)}")
    embeds, hidden, logits = (t.to(device) for t in parts if t is not None)
    return embeds, hidden, logits


def vispec_batch(
    answer: Mapping[str, torch.Tensor],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    loss_mask: torch.Tensor,
    image_token_id: int,
    device: torch.device,
) -> Any:
    """Upstream's ``VispecTargetBatch`` from a ViSpec answer and its request, on ``device``.

    One builder for ``RemoteVispecTargetModel.generate_batch`` and a stream's kept answer, so that
    both are ``HFVispecTargetModel``'s batch: the shifts and the image mask
    (``input_ids == image_token_id``, the id the servers name) are copies and comparisons.
    """
    embeds, hidden, logits = _vlm_answer(answer, input_ids, device, CAPTURE_VISPEC)
    ids = input_ids.to(device)
    return vispec_batch_type()(
        inputs_embeds=shift_left(embeds),
        input_hidden_states=hidden,
        target_logits=shift_left(logits),
        attention_mask=attention_mask.to(device),
        loss_mask=shift_left(loss_mask.to(device)),
        image_mask=shift_left((ids == image_token_id).to(ids.dtype)).bool(),
    )


def msd_batch(
    answer: Mapping[str, torch.Tensor],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    loss_mask: torch.Tensor,
    image_token_id: int,
    device: torch.device,
) -> Any:
    """Upstream's ``MSDTargetBatch`` from an MSD answer and its request, on ``device`` (one builder, as
    :func:`vispec_batch`). ``loss_mask`` is already aligned to next-token logits, as upstream takes it."""
    embeds, hidden, logits = _vlm_answer(answer, input_ids, device, CAPTURE_MSD)
    supervised = loss_mask.to(device).bool().clone()
    supervised[:, -1] = False  # the shifted tensors' zero tail has nothing to match
    return msd_batch_type()(
        inputs_embeds=shift_left(embeds),
        input_hidden_states=hidden,
        target_hidden_states=shift_left(hidden),
        target_logits=shift_left(logits),
        attention_mask=attention_mask.to(device),
        loss_mask=supervised,
        image_mask=shift_left(input_ids.to(device).eq(image_token_id)),
    )
