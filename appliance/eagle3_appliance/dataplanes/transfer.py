"""The transfer step: how one ``/generate`` answer leaves the server.

Every way out implements :class:`Transfer`: :meth:`Transfer.prepare` runs on the model thread
right after the supervision is computed (it puts the tensors where the send needs them), and
:meth:`Transfer.send` runs on the event loop and returns the tier that carried the answer.
This module has the interface and the plain HTTP-body answer (:class:`WireTransfer`, upstream's
format); :mod:`eagle3_appliance.dataplanes.group_plane` (our NCCL/gloo groups) and
:mod:`eagle3_appliance.dataplanes.upstream_nccl` (upstream's NCCL path) implement the others, and
:func:`eagle3_appliance.serving.pipeline.choose_transfer` is the one place that picks among them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping

import torch
from sanic import Request

from eagle3_appliance.core.admission import Ticket
from eagle3_appliance.dataplanes.buffers import ServerBuffers
from eagle3_client import protocol, wire

__all__ = ["SEND_SLICE_BYTES", "Transfer", "WireTransfer", "device_ready", "host_copy", "send_wire"]

# Response bodies are written in slices so that the socket's flow control paces us and
# the transport never queues more than about one slice of a large tensor (uvloop queues
# views, not copies). 1 MiB measured fastest on loopback (4.1 GB/s against 3.0 at 4 MiB).
SEND_SLICE_BYTES = 1024 * 1024


class Transfer(ABC):
    """One answer's way out: ``prepare`` on the model thread, then ``send`` on the event loop."""

    #: The data plane the client asked for, when it asked for one that may fall back to the wire.
    requested: str | None = None

    @abstractmethod
    def prepare(self, supervision: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Make the tensors ready for :meth:`send` (host copies, or device tensors with the stream done)."""

    @abstractmethod
    async def send(
        self,
        request: Request,
        supervision: dict[str, torch.Tensor],
        ticket: Ticket | None,
        headers: Mapping[str, str] | None,
    ) -> str:
        """Answer the request and move the tensors; returns the tier that carried them."""


async def send_wire(
    request: Request,
    tensors: Mapping[str, torch.Tensor | None],
    ticket: Ticket | None = None,
    headers: Mapping[str, str] | None = None,
) -> None:
    """Stream a wire blob: each entry header, then the tensor's own memory, no concatenation."""
    parts, total = wire.encode_parts(tensors)
    if ticket is not None:
        ticket.encoded()
    response = await request.respond(
        content_type=protocol.OCTET_STREAM, headers={**(headers or {}), "content-length": str(total)}
    )
    for part in parts:
        view = memoryview(part)
        for start in range(0, view.nbytes, SEND_SLICE_BYTES):
            await response.send(view[start : start + SEND_SLICE_BYTES])
    if ticket is not None:
        ticket.sent(total)


def host_copy(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors (no copy for tensors that already are)."""
    return {key: t.detach().to("cpu").contiguous() for key, t in tensors.items()}


def device_ready(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous, on their device, with the producing stream finished (the sender runs on another thread)."""
    out = {key: t.detach().contiguous() for key, t in tensors.items()}
    for t in out.values():
        if t.is_cuda:
            torch.cuda.current_stream(t.device).synchronize()
            break
    return out


class WireTransfer(Transfer):
    """The answer as a wire blob in the HTTP body (upstream's format), from pooled host memory."""

    def __init__(self, buffers: ServerBuffers) -> None:
        self.buffers = buffers

    def prepare(self, supervision: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.buffers.to_host(supervision)

    async def send(
        self,
        request: Request,
        supervision: dict[str, torch.Tensor],
        ticket: Ticket | None,
        headers: Mapping[str, str] | None,
    ) -> str:
        await send_wire(request, supervision, ticket, headers)
        return protocol.TIER_WIRE
