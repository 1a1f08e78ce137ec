"""Choosing a session's supervision encoding from the client's ``POST /session`` offer.

The client lists what it can decode, best first (``"encoding"``, then ``"encodings"``); the
server takes the first it can send for this model. ``hidden`` needs a model whose logits are
exactly ``linear(lm_head_input, lm_head.weight)`` (:meth:`Target.hidden_refusal`); ``topk:K``
needs ``K <= D``, checked once the draft vocabulary is known (:func:`check_mapping`).
"""

from __future__ import annotations

from eagle3_appliance.core.inputs import VocabMapping
from eagle3_appliance.errors import ApplianceError
from eagle3_appliance.model.target import Target
from eagle3_client import protocol
from eagle3_client.encodings import Encoding, parse_encoding
from eagle3_client.protocol import SessionOffer

__all__ = ["EncodingError", "check_mapping", "choose_encoding", "granted_capabilities", "offered_encodings"]


class EncodingError(ApplianceError):
    """An encoding that is unknown, malformed, or cannot be used with this model or mapping."""

    status_code = 422


def granted_capabilities(offer: SessionOffer, target: Target) -> frozenset[str]:
    """The request extensions of ``offer`` this server grants: those it knows and this model can do.

    ``packing`` needs a model whose forward takes ``position_ids``; ``streamed-answer`` is always
    granted (the server streams where it can, :mod:`eagle3_appliance.dataplanes.streaming`,
    and answers whole elsewhere), and so is ``stream`` (claims of kept answers always work; a
    server started with ``--stream-memory-mb 0`` refuses to produce). Unknown names are ignored
    (a newer client asking for more), so the reply tells the client what it may send.
    """
    granted = set()
    for name in offer.capabilities:
        if name == protocol.CAPABILITY_PACKING and target.packing_refusal() is None:
            granted.add(name)
        elif name in (protocol.CAPABILITY_STREAMED_ANSWER, protocol.CAPABILITY_STREAM):
            granted.add(name)
    return frozenset(granted)


def offered_encodings(offer: SessionOffer) -> list[Encoding]:
    """The encodings a ``POST /session`` offer accepts, best first: ``encoding`` then ``encodings``.

    No ``"encoding"`` key means upstream's probs. Every name must parse (422 otherwise).
    """
    out: list[Encoding] = []
    for name in (offer.encoding, *offer.encodings):
        try:
            encoding = parse_encoding(name)
        except ValueError as exc:
            raise EncodingError(str(exc)) from None
        if encoding not in out:
            out.append(encoding)
    return out


def choose_encoding(offered: list[Encoding], hidden_refused: str | None) -> tuple[Encoding, str | None]:
    """The first offered encoding this server can send, and why the preferred one was not chosen.

    ``hidden_refused`` is :meth:`Target.hidden_refusal` for this model. Raises 422 when none fits.
    """
    reasons: list[str] = []
    for encoding in offered:
        if encoding.kind == protocol.ENCODING_HIDDEN and hidden_refused is not None:
            reasons.append(f"'hidden' is not available for this model: {hidden_refused}")
            continue
        return encoding, ("; ".join(reasons) or None)
    raise EncodingError("; ".join(reasons) or "no encoding offered")


def check_mapping(encoding: Encoding, mapping: VocabMapping) -> None:
    """``topk:K`` needs ``K <= D``: checked when a session's draft vocabulary becomes known."""
    if encoding.k is not None and encoding.k > mapping.draft_vocab_size:
        raise EncodingError(
            f"encoding {encoding.name} keeps more entries than the draft vocabulary has ({mapping.draft_vocab_size}); "
            "use K <= D"
        )
