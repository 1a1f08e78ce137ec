"""The limit of any serving system: the same model's bare forward, softmax and argmax, in this process.

A server must at least run the forward and turn the logits into probabilities; everything it
does beyond that (captures, projection, copies, the send, the client's receive) is overhead.
:func:`bare_step` is that minimum, written the plain way: the checkpoint built without any
of the server's hooks, ``model(input_ids, attention_mask)``, ``softmax(logits.float(), -1)``
over the whole vocabulary and ``argmax(-1)``, synchronised on CUDA. The benchmarks time it
alternating with the served requests, so a shared machine's load hits both alike, and print
the served rate as a fraction of it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from eagle3_appliance.model import checkpoint
from eagle3_appliance.model.loading import resolve_device, resolve_dtype
from eagle3_appliance.settings import Settings

__all__ = ["bare_model", "bare_step", "calls_per_second", "time_once"]


def bare_model(settings: Settings) -> torch.nn.Module:
    """The served checkpoint as ``load_target`` builds it (device, dtype), without the Target's hooks."""
    device = resolve_device(settings.device)
    model = checkpoint.build_model(settings, device, resolve_dtype(settings.dtype, device))
    return model.eval().requires_grad_(False)


def bare_step(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Callable[[], None]:
    """One bare forward + softmax + argmax of ``model`` on these inputs (moved to its device once)."""
    device = next(model.parameters()).device
    ids, mask = input_ids.to(device), attention_mask.to(device)

    @torch.no_grad()
    def step() -> None:
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        probs = torch.softmax(logits.float(), dim=-1)
        top = logits.argmax(dim=-1)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        del logits, probs, top

    return step


def calls_per_second(fn: Callable[[], object], calls: int) -> float:
    """How many calls of ``fn`` a second, over ``calls`` calls in a row (e.g. of :func:`bare_step`)."""
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return calls / (time.perf_counter() - start)


def time_once(fn: Callable[[], object]) -> float:
    """Seconds one call of ``fn`` takes."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start
