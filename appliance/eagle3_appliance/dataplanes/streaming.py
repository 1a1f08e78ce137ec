"""A wire answer that leaves while it is computed (capability ``streamed-answer``, issue #34 item 4).

Why: the ``probs`` answer's ``target_probs`` ``[B,T,D]`` is most of the body, and the projection
fills it in body order, batch row by batch row, slice by slice
(:func:`eagle3_appliance.model.projection.project_into`). Every shape is known before the first
slice, so the body's length and every entry header are too: the server can answer at once and
write each row of ``target_probs`` as soon as it is final, while later slices are computed.

How: the model thread publishes the answer's layout and then a watermark ("the first ``n`` rows
are final") through :class:`AnswerStream`; :func:`send_streamed` on the event loop writes the
entries in body order, ``target_probs`` up to the watermark, and the entries computed last
(``position_mask`` from the argmax, the shifted ids and loss mask) once the answer is complete.
The bytes are exactly the whole-answer path's (the same tensors in the same order); only when
they leave differs.

A failure after the head went out can only be told by cutting the connection mid-body: the
client sees a short body, a transport failure it retries under the same request id. That is why
only sessions that negotiated the capability get it; an upstream client never offers it and is
answered whole, then sent, as upstream does. The model thread's writes into ``target_probs`` and
the sender's reads of it never overlap: rows are read only after the watermark passed them, and
the watermark is published after they are written.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import cast

import torch
from sanic import Request

from eagle3_appliance.core.admission import Ticket
from eagle3_client import protocol, wire

__all__ = ["AnswerStream", "StreamBroken", "send_streamed", "streamed_layout"]

STREAMED_KEY = "target_probs"


class StreamBroken(RuntimeError):
    """The answer could not be completed after its head had gone out (the connection was cut)."""


class AnswerStream:
    """One answer's progress, from the model thread to the event loop.

    ``layout`` is the answer's entries in body order: real tensors for what is final or being
    filled (``aux_hidden_states``, ``target_probs``), ``meta`` tensors of the right dtype and
    shape for what is computed last. ``rows`` counts the final rows of ``target_probs`` as
    ``[B*T, D]``.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._changed = asyncio.Event()
        self.layout: dict[str, torch.Tensor] | None = None
        self.rows = 0
        self.ended = False

    # -- the model thread ---------------------------------------------------------------

    def begin(self, layout: dict[str, torch.Tensor]) -> None:
        """Publish the layout (once): the sender may answer now."""
        self._loop.call_soon_threadsafe(self._publish, layout, 0)

    def advance(self, rows: int) -> None:
        """Publish that the first ``rows`` rows of ``target_probs`` are final."""
        self._loop.call_soon_threadsafe(self._publish, None, rows)

    # -- the event loop -----------------------------------------------------------------

    def _publish(self, layout: dict[str, torch.Tensor] | None, rows: int) -> None:
        if layout is not None:
            self.layout = layout
        self.rows = max(self.rows, rows)
        self._changed.set()

    def end(self) -> None:
        """The computation is over (answer, error or cancellation): wake the sender."""
        self.ended = True
        self._changed.set()

    async def changed(self) -> None:
        """Wait until something was published or the computation ended."""
        await self._changed.wait()
        self._changed.clear()


def streamed_layout(
    aux_hidden_states: torch.Tensor, probs: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The ``probs`` answer's entries in body order (``protocol.SUPERVISION_KEYS``), before it is complete."""
    batch, seq_len = input_ids.shape

    def meta(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device="meta")

    layout = {
        "aux_hidden_states": aux_hidden_states.detach().contiguous(),
        STREAMED_KEY: probs,
        "position_mask": meta((batch, seq_len, 1), torch.bool),
        "input_ids": meta((batch, seq_len), input_ids.dtype),
        "loss_mask": meta((batch, seq_len), loss_mask.dtype),
    }
    assert tuple(layout) == protocol.SUPERVISION_KEYS
    return layout


async def send_streamed(
    request: Request,
    stream: AnswerStream,
    answer: asyncio.Future[dict[str, torch.Tensor]],
    ticket: Ticket | None,
    headers: Mapping[str, str] | None,
    slice_bytes: int,
) -> dict[str, torch.Tensor]:
    """Write the answer whose layout ``stream`` published, as it becomes final; returns the answer.

    ``answer`` resolves to the complete answer (the whole-answer path's dict). If it fails, or
    does not match the layout announced in the head, the connection is cut mid-body and
    :class:`StreamBroken` raised (the answer's error as its cause).
    """
    layout = stream.layout
    assert layout is not None
    total = wire.encoded_size(layout)
    response = await request.respond(
        content_type=protocol.OCTET_STREAM, headers={**(headers or {}), "content-length": str(total)}
    )

    async def write(view: memoryview) -> None:
        for start in range(0, view.nbytes, slice_bytes):
            await response.send(view[start : start + slice_bytes])

    try:
        await response.send(wire.magic_bytes())
        for key, tensor in layout.items():
            await response.send(wire.entry_header(key, tensor))
            if key == STREAMED_KEY:
                await _write_rows(tensor, stream, answer, write)
                continue
            if tensor.device.type == "meta":
                done = await _complete(answer, stream)
                if ticket is not None and ticket.encoded_at is None:
                    ticket.encoded()  # the "send" phase is what remained to send after the computation
                final = done[key]
                if wire.entry_header(key, final) != wire.entry_header(key, tensor):
                    raise StreamBroken(f"{key!r} does not match the layout announced in the head")
                tensor = final
            await write(wire.tensor_bytes(tensor))
        done = await _complete(answer, stream)
    except BaseException as exc:
        cast(asyncio.Transport, request.transport).abort()  # a short body: the client retries; never a wrong answer
        if isinstance(exc, Exception) and not isinstance(exc, StreamBroken):
            raise StreamBroken(f"the streamed answer broke after its head went out: {exc}") from exc
        raise
    if ticket is not None:
        ticket.sent(total)
    return done


async def _write_rows(
    probs: torch.Tensor,
    stream: AnswerStream,
    answer: asyncio.Future[dict[str, torch.Tensor]],
    write: Callable[[memoryview], Awaitable[None]],
) -> None:
    """``target_probs``' bytes, each as soon as the watermark passed its row."""
    data = wire.tensor_bytes(probs)
    row_bytes = data.nbytes // max(1, probs.shape[0] * probs.shape[1])
    sent = 0
    while sent < data.nbytes:
        final = stream.rows * row_bytes
        if final > sent:
            await write(data[sent:final])
            sent = final
            continue
        if stream.ended:
            await _complete(answer, stream)  # raises the computation's error
            if stream.rows * row_bytes <= sent:
                raise StreamBroken("the answer completed without finishing target_probs")
            continue
        await stream.changed()


async def _complete(answer: asyncio.Future[dict[str, torch.Tensor]], stream: AnswerStream) -> dict[str, torch.Tensor]:
    """The complete answer (the computation's error if it failed)."""
    while not answer.done():
        await stream.changed()
    return answer.result()
