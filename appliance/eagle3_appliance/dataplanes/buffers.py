"""The server's reusable memory for ``/generate`` answers.

Why: an answer is ~300 MB for a 2048-token batch of an 8B target. Allocating it afresh per
request costs page faults on the CPU and, on CUDA, an unpinned device-to-host copy; both
are avoided by writing into blocks of a :class:`eagle3_client.transports.buffers.BufferPool` (pinned on CUDA).

Reuse is safe without any explicit release (see :mod:`eagle3_client.transports.buffers`): a block is handed
out again only when nothing references it. The answer being written to the socket is
referenced by the handler and by the transport's queued byte views
(:func:`eagle3_client.wire.tensor_bytes` keeps its tensor alive), so while request N is still
being sent, the forward of request N+1 gets a second block set; after warm-up the server
alternates between as many sets as it has answers in flight, and allocates nothing
proportional to the payload (``python -m benchmarks.wire`` shows peak RSS staying flat).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from eagle3_appliance.core.inputs import Allocator
from eagle3_client.transports.buffers import BufferPool

__all__ = ["ServerBuffers"]


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
