"""Optional micro-batching: concurrent ``/generate`` requests of one sequence length, one forward.

Why: with several trainer ranks on one server, each forward is small and the model thread
runs them one after another; stacking them along the batch dimension runs one larger
forward instead. The projection stays per request (each session has its own draft vocab).

**Numerics: this is an opt-in, not bit-exact mode.** A stacked forward runs matmuls of
other shapes, and BLAS kernels may sum in another order for them, so answers can differ
from the unbatched (in-process) computation in the last bits of the floats; a rare argmax
tie can flip a ``position_mask`` entry. ``python -m loadtest.bench --microbatch`` measures
the throughput gain and the largest deviation. A request that is alone in its window is
computed exactly as without batching (bit-exact). Only requests with the *same* sequence
length are stacked: padding to a common length would change the numerics further.

Off by default (``--microbatch-wait-ms 0``). When on, the first request of a group waits at
most ``wait_ms`` for companions; a group is flushed early once it holds ``max_tokens``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from appliance.buffers import ServerBuffers, supervise_into
from appliance.projection import project_into
from appliance.target import Target, VocabMapping

__all__ = ["MicroBatcher"]


@dataclass
class _Request:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor
    mapping: VocabMapping
    future: asyncio.Future[dict[str, torch.Tensor]]


@dataclass
class _Group:
    requests: list[_Request] = field(default_factory=list)
    tokens: int = 0
    timer: asyncio.TimerHandle | None = None


class MicroBatcher:
    """Collects requests on the event loop and runs each group on the model runner.

    ``run(fn, *args)`` is the server's one-thread model executor (``ModelRunner.run``), so
    a group's forward is still serialised with every other use of the model.
    """

    def __init__(
        self,
        target: Target,
        buffers: ServerBuffers,
        run: Callable[..., Awaitable[Any]],
        *,
        wait_s: float,
        max_tokens: int,  # noqa: ANN001
    ) -> None:
        if wait_s <= 0:
            raise ValueError("micro-batching needs a positive wait")
        if max_tokens < 1:
            raise ValueError("micro-batching needs a positive token budget")
        self._target = target
        self._buffers = buffers
        self._run = run
        self.wait_s = wait_s
        self.max_tokens = max_tokens
        self._open: dict[int, _Group] = {}
        self.groups_run = 0
        self.requests_run = 0

    async def supervise(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor, mapping: VocabMapping
    ) -> dict[str, torch.Tensor]:
        """The host-side supervision of one request, computed in a group with its companions."""
        loop = asyncio.get_running_loop()
        request = _Request(input_ids, attention_mask, loss_mask, mapping, loop.create_future())
        seq_len, tokens = int(input_ids.shape[1]), int(input_ids.numel())
        group = self._open.get(seq_len)
        if group is not None and group.tokens + tokens > self.max_tokens:
            self._flush(seq_len, group)
            group = None
        if group is None:
            group = _Group()
            self._open[seq_len] = group
            group.timer = loop.call_later(self.wait_s, self._flush, seq_len, group)
        group.requests.append(request)
        group.tokens += tokens
        if group.tokens >= self.max_tokens:
            self._flush(seq_len, group)
        return await request.future

    def _flush(self, seq_len: int, group: _Group) -> None:
        if self._open.get(seq_len) is not group:
            return  # already flushed (budget reached before the timer fired)
        del self._open[seq_len]
        if group.timer is not None:
            group.timer.cancel()
        asyncio.ensure_future(self._complete(group))

    async def _complete(self, group: _Group) -> None:
        requests = [r for r in group.requests if not r.future.done()]  # cancelled: client went away
        if not requests:
            return
        try:
            results = await self._run(self._compute, requests)
        except Exception as exc:  # noqa: BLE001 - every request of the group gets the error
            for request in requests:
                if not request.future.done():
                    request.future.set_exception(exc)
            return
        self.groups_run += 1
        self.requests_run += len(requests)
        for request, result in zip(requests, results, strict=True):
            if not request.future.done():
                request.future.set_result(result)

    @torch.no_grad()
    def _compute(self, requests: list[_Request]) -> list[dict[str, torch.Tensor]]:
        """On the model thread: one forward over the stacked rows, then each request's projection."""
        target, buffers = self._target, self._buffers
        if len(requests) == 1:
            r = requests[0]
            return [supervise_into(target, buffers, r.input_ids, r.attention_mask, r.loss_mask, r.mapping)]
        device = target.device
        input_ids = torch.cat([r.input_ids for r in requests]).to(device)
        attention_mask = torch.cat([r.attention_mask for r in requests]).to(device)
        alloc = buffers.device_alloc()
        aux, logits = target.forward(input_ids, attention_mask, alloc=alloc)
        results = []
        start = 0
        for r in requests:
            stop = start + int(r.input_ids.shape[0])
            projected = project_into(
                aux[start:stop],
                logits[start:stop],
                r.input_ids.to(device),
                r.loss_mask.to(device),
                r.mapping,
                alloc=alloc,
            )
            results.append(buffers.to_host(projected))
            start = stop
        return results
