"""The server's reusable memory for ``/generate`` answers, and the supervise-into-buffers path.

Why: an answer is ~300 MB for a 2048-token batch of an 8B target. Allocating it afresh per
request costs page faults on the CPU and, on CUDA, an unpinned device-to-host copy; both
are avoided by writing into blocks of a :class:`client.buffers.BufferPool` (pinned on CUDA).

Reuse is safe without any explicit release (see :mod:`client.buffers`): a block is handed
out again only when nothing references it. The answer being written to the socket is
referenced by the handler and by the transport's queued byte views
(:func:`client.wire.tensor_bytes` keeps its tensor alive), so while request N is still
being sent, the forward of request N+1 gets a second block set; after warm-up the server
alternates between as many sets as it has answers in flight, and allocates nothing
proportional to the payload (``python -m loadtest.bench`` shows peak RSS staying flat).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from appliance.projection import Allocator, project_into
from appliance.target import Target, VocabMapping
from client.buffers import BufferPool

__all__ = ["ServerBuffers", "supervise_into", "supervise_on_device"]


class ServerBuffers:
    """Host memory for answers (pinned when the model is on CUDA) and the device allocator.

    On the CPU the projection writes straight into the host pool, so the tensors it returns
    are already the wire's source. On CUDA the device side uses the caching allocator and
    each answer is copied once into pinned host blocks.
    """

    def __init__(self, device: torch.device | str, max_bytes: int) -> None:
        self.device = torch.device(device)
        self.host = BufferPool(max_bytes, pin_memory=self.device.type == "cuda")

    def device_alloc(self) -> Allocator:
        if self.device.type == "cpu":
            return self.host.empty
        device = self.device

        def alloc(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
            return torch.empty(tuple(shape), dtype=dtype, device=device)

        return alloc

    def to_host(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Contiguous CPU tensors for the wire: device tensors are copied into pooled host blocks."""
        out: dict[str, torch.Tensor] = {}
        copied = False
        for key, tensor in tensors.items():
            tensor = tensor.detach()
            if tensor.device.type == "cpu":
                out[key] = tensor.contiguous()
                continue
            host = self.host.empty(tensor.shape, tensor.dtype)
            host.copy_(tensor, non_blocking=True)
            out[key] = host
            copied = True
        if copied and self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # the wire reads these next
        return out


@torch.no_grad()
def supervise_on_device(
    target: Target,
    buffers: ServerBuffers,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    loss_mask: torch.Tensor,
    mapping: VocabMapping,
) -> dict[str, torch.Tensor]:
    """``Target.supervise``, bit-identical, computed into reused memory on the model's device."""
    device = target.device
    input_ids, attention_mask, loss_mask = (t.to(device) for t in (input_ids, attention_mask, loss_mask))
    alloc = buffers.device_alloc()
    aux, logits = target.forward(input_ids, attention_mask, alloc=alloc)
    result = project_into(aux, logits, input_ids, loss_mask, mapping, alloc=alloc)
    del logits, aux
    return result


def supervise_into(
    target: Target,
    buffers: ServerBuffers,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    loss_mask: torch.Tensor,
    mapping: VocabMapping,
) -> dict[str, torch.Tensor]:
    """``Target.supervise`` plus the copy to the host, bit-identical, into reused memory."""
    return buffers.to_host(supervise_on_device(target, buffers, input_ids, attention_mask, loss_mask, mapping))
