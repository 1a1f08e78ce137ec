"""What a stream answer is made of: its size before the forward, its kept tensors, its reference.

``/stream/produce`` runs the ``/generate`` steps with one difference at the end: the answer is
not sent but kept (:class:`KeepTransfer`), with the request's tensors beside it, so that a
trainer that claims it later gets everything its batch needs from this appliance alone. A
claim (``/generate`` with ``X-Eagle3-Sample``) sends that dictionary on the claiming session's
data plane like any answer. The reference (:func:`stream_ref`) describes the tensors the
consumer's store returns: the decoded supervision (``target_probs`` float32 ``[B,T,D]``
whatever encoding travelled), and the request's tensors as they were sent. A DSpark answer is
named as upstream's ``FeatureAlgorithm.DSPARK`` schema names it (``target_hidden_states``,
``target_last_hidden_states``), each mapped to its wire key, so that a consumer never takes it
for a DFlash answer (whose ``hidden_states`` is another layer set's features). A ViSpec or MSD
answer (``inputs_embeds``, ``hidden_states``, ``logits``, unshifted) is kept with the request's
ids and masks, which the consumer's batch needs (the image mask comes from ``input_ids``), not
its vision tensors, which it does not: the kept size is the answer's and those, as estimated.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from sanic import Request

from eagle3_appliance.core.admission import Ticket
from eagle3_appliance.core.inputs import GenerateInputs, VocabMapping
from eagle3_appliance.dataplanes.transfer import Transfer, device_ready
from eagle3_appliance.model import capture as captures
from eagle3_appliance.model.limits import TargetShape
from eagle3_client import protocol
from eagle3_client.capture import DSPARK_FEATURES, Capture
from eagle3_client.encodings import Encoding, wire_bytes_per_token

__all__ = ["STREAM_SCHEMA_VERSION", "KeepTransfer", "estimate_bytes", "kept_tensors", "stream_ref"]

# Upstream's EAGLE-3 (and DFlash, DSpark) stream schema version (nemo_automodel ... streaming.eagle3).
STREAM_SCHEMA_VERSION = 1


class KeepTransfer(Transfer):
    """The answer stays here: owned copies on the target's device (the supervision buffers are reused)."""

    def prepare(self, supervision: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return device_ready({key: t.detach().clone() for key, t in supervision.items()})

    async def send(
        self,
        request: Request,
        supervision: dict[str, torch.Tensor],
        ticket: Ticket | None,
        headers: Mapping[str, str] | None,
    ) -> str:  # pragma: no cover - a kept answer is claimed, never sent by its producer
        raise RuntimeError("a kept answer is sent by its claim")


def _request_tensors(inputs: GenerateInputs) -> dict[str, torch.Tensor]:
    tensors = {"input_ids": inputs.input_ids, "attention_mask": inputs.attention_mask, "loss_mask": inputs.loss_mask}
    if inputs.packing is not None:
        for key in protocol.PACKING_KEYS:
            tensors[key] = getattr(inputs.packing, key)
    return tensors


def estimate_bytes(
    shape: TargetShape, capture: Capture, encoding: Encoding, mapping: VocabMapping | None, inputs: GenerateInputs
) -> int:
    """The kept answer's size, from the request alone (exact for every capture and encoding)."""
    tokens = inputs.tokens
    # The request's tensors the answer does not carry (EAGLE-3's carries input_ids and loss_mask,
    # counted in wire_bytes_per_token), as kept_tensors adds them.
    carried = () if not capture.is_eagle3 else ("input_ids", "loss_mask")
    extra = sum(t.numel() * t.element_size() for key, t in _request_tensors(inputs).items() if key not in carried)
    if not capture.is_eagle3:
        return tokens * captures.answer_bytes_per_token(shape, capture) + extra
    assert mapping is not None
    per_token = wire_bytes_per_token(
        encoding,
        hidden_size=shape.hidden_size,
        draft_vocab=mapping.draft_vocab_size,
        dtype_bytes=shape.dtype_bytes,
        ids_bytes=inputs.input_ids.element_size(),
        loss_mask_bytes=inputs.loss_mask.element_size(),
    )
    return tokens * per_token + extra


def kept_tensors(
    answer: Mapping[str, torch.Tensor], inputs: GenerateInputs, device: torch.device
) -> dict[str, torch.Tensor]:
    """The supervision, then the request's tensors it does not carry already (on the answer's device)."""
    kept = dict(answer)
    for key, tensor in _request_tensors(inputs).items():
        if key not in kept:
            kept[key] = tensor.to(device)
    return kept


def stream_ref(
    run_id: str,
    sample_id: str,
    store_uri: str,
    kept: Mapping[str, torch.Tensor],
    capture: Capture,
    mapping: VocabMapping | None,
    fingerprint: str,
) -> protocol.StreamRef:
    """The tensor-free reference that announces ``kept`` (what the consumer's store returns, decoded)."""
    specs: dict[str, tuple[tuple[int, ...], str]] = {}
    keys: dict[str, str] = {}  # feature name -> its key in the kept answer

    def spec(name: str, tensor_shape: tuple[int, ...], dtype: torch.dtype, key: str | None = None) -> None:
        specs[name] = (tuple(int(d) for d in tensor_shape), str(dtype).removeprefix("torch."))
        keys[name] = key or name

    if capture.is_eagle3:
        assert mapping is not None
        aux = kept["aux_hidden_states"]
        batch, seq_len = aux.shape[:2]
        spec("aux_hidden_states", tuple(aux.shape), aux.dtype)
        spec("target_probs", (batch, seq_len, mapping.draft_vocab_size), torch.float32)
        spec("position_mask", (batch, seq_len, 1), torch.bool)
    elif capture.is_dspark:
        for name, key in DSPARK_FEATURES.items():
            spec(name, tuple(kept[key].shape), kept[key].dtype, key)
    else:  # DFlash (hidden states, logits when captured), ViSpec and MSD (VLM_KEYS): named as kept
        for key in capture.keys:
            spec(key, tuple(kept[key].shape), kept[key].dtype)
    for key in protocol.SAMPLE_INPUT_KEYS:
        if key in kept:
            spec(key, tuple(kept[key].shape), kept[key].dtype)
    nbytes = sum(_numel(shape) * _itemsize(dtype) for shape, dtype in specs.values())
    return protocol.StreamRef(
        sample_id=sample_id,
        run_id=run_id,
        store_uri=store_uri,
        feature_keys=keys,
        feature_specs=specs,
        algorithm=capture.algorithm,
        schema_version=STREAM_SCHEMA_VERSION,
        num_tokens=int(kept["attention_mask"].sum()),
        estimated_bytes=nbytes,
        target_model_version=fingerprint,
    )


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _itemsize(dtype: str) -> int:
    return int(getattr(torch, dtype).itemsize)
