"""Optional micro-batching: concurrent ``/generate`` requests of one sequence length, one forward.

Why: with several trainer ranks on one server, each forward is small and the model thread
runs them one after another; stacking them along the batch dimension runs one larger
forward instead. Everything else stays per request: each request's supervision (its own
draft vocabulary and encoding) and its transfer (:mod:`eagle3_appliance.serving.pipeline` runs
a group exactly as it runs a single request, through the same admission, time limit and
metrics).

**Numerics: this is an opt-in, not bit-exact mode.** A stacked forward runs matmuls of
other shapes, and BLAS kernels may sum in another order for them, so answers can differ
from the unbatched (in-process) computation in the last bits of the floats; a rare argmax
tie can flip a ``position_mask`` entry. ``python -m benchmarks.wire --microbatch`` measures
the throughput gain and the largest deviation. A request that is alone in its window is
computed exactly as without batching (bit-exact). Only requests with the *same* sequence
length are stacked: padding to a common length would change the numerics further.

Packed requests (several documents per row) are never stacked: each runs alone, bit-exact,
through the same admission and metrics (the pipeline does not hand them to the batcher). A
FlashAttention target can pack only one row per forward, and a packed row is already the
dense batch that micro-batching would otherwise build.

Off by default (``--microbatch-wait-ms 0``). When on, the first request of a group waits at
most ``wait_ms`` for companions; a group is flushed early once it holds ``max_tokens``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

__all__ = ["MicroBatcher"]

Job = TypeVar("Job")
Result = TypeVar("Result")


@dataclass
class _Pending(Generic[Job, Result]):
    job: Job
    future: asyncio.Future[Result]


@dataclass
class _Group(Generic[Job, Result]):
    pending: list[_Pending[Job, Result]] = field(default_factory=list)
    tokens: int = 0
    timer: asyncio.TimerHandle | None = None


class MicroBatcher(Generic[Job, Result]):
    """Collects jobs on the event loop and hands each group to ``run_group`` (one forward).

    ``run_group(jobs)`` returns one result per job, in order; the pipeline runs it on the
    model thread, so a group is still serialised with every other use of the model. A job
    whose caller stopped waiting (timeout, client gone) before its group starts is left out.
    """

    def __init__(
        self,
        run_group: Callable[[list[Job]], Awaitable[list[Result]]],
        *,
        wait_s: float,
        max_tokens: int,
    ) -> None:
        if wait_s <= 0:
            raise ValueError("micro-batching needs a positive wait")
        if max_tokens < 1:
            raise ValueError("micro-batching needs a positive token budget")
        self._run_group = run_group
        self.wait_s = wait_s
        self.max_tokens = max_tokens
        self._open: dict[int, _Group[Job, Result]] = {}
        self.groups_run = 0
        self.jobs_run = 0

    async def submit(self, job: Job, *, seq_len: int, tokens: int) -> Result:
        """The result of one job, computed in a group with its companions of the same ``seq_len``."""
        loop = asyncio.get_running_loop()
        pending: _Pending[Job, Result] = _Pending(job, loop.create_future())
        group = self._open.get(seq_len)
        if group is not None and group.tokens + tokens > self.max_tokens:
            self._flush(seq_len, group)
            group = None
        if group is None:
            group = _Group()
            self._open[seq_len] = group
            group.timer = loop.call_later(self.wait_s, self._flush, seq_len, group)
        group.pending.append(pending)
        group.tokens += tokens
        if group.tokens >= self.max_tokens:
            self._flush(seq_len, group)
        return await pending.future

    def _flush(self, seq_len: int, group: _Group[Job, Result]) -> None:
        if self._open.get(seq_len) is not group:
            return  # already flushed (budget reached before the timer fired)
        del self._open[seq_len]
        if group.timer is not None:
            group.timer.cancel()
        asyncio.ensure_future(self._complete(group))

    async def _complete(self, group: _Group[Job, Result]) -> None:
        pending = [p for p in group.pending if not p.future.done()]  # cancelled: nobody waits
        if not pending:
            return
        try:
            results = await self._run_group([p.job for p in pending])
        except Exception as exc:  # noqa: BLE001 - every job of the group gets the error
            for p in pending:
                if not p.future.done():
                    p.future.set_exception(exc)
            return
        self.groups_run += 1
        self.jobs_run += len(pending)
        for p, result in zip(pending, results, strict=True):
            if not p.future.done():
                p.future.set_result(result)
