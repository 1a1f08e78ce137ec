"""The LM head's logits written into reused memory on the CPU, bit-identical to the head's own output.

Why: the logits are the largest tensor a forward makes (``[B,T,V]``: 268 MB for 2048 tokens
of a 32k vocabulary), and on the CPU a fresh tensor that size page-faults on every first
touch because glibc returns such blocks to the kernel on free. Measured on the 2-core CI
machine: filling 268 MB of fresh memory took 100-700 ms of CPU, the same in a reused block
11-20 ms; the fresh logits were a large part of every served forward (and they are of a
plain in-process forward too). The projection only reads the logits, on the model thread,
so a pooled block serves: nothing else holds it once the answer is projected.

Why the bits are the same: ``nn.Linear`` without a bias is ``matmul(x, weight.t())``
(``torch.nn.functional.linear``), and ``matmul(..., out=)`` folds the same leading dimensions
and calls the same ``mm`` kernel on the same operands; only the output's memory differs.
``tests/test_pooled_head.py`` checks it bit for bit on the built-in model (float32, bfloat16,
float16), and the round-trip tests check served answers against the in-process reference.
Anything else (a bias, a subclass or a patched forward, a quantised or offloaded head, another
dtype at call time) keeps the head's own forward. On an accelerator the caching allocator
already reuses memory, so the head is left alone there.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from eagle3_appliance.core.inputs import Allocator

__all__ = ["pooled_head_supported", "pooled_logits"]


def pooled_head_supported(head: nn.Module | None) -> bool:
    """True for a plain CPU ``nn.Linear`` without a bias (no subclass, no patched forward, no accelerate hooks)."""
    if type(head) is not nn.Linear or head.bias is not None or hasattr(head, "_hf_hook") or "forward" in vars(head):
        return False
    weight = head.weight
    return isinstance(weight, torch.Tensor) and weight.device.type == "cpu" and not weight.is_quantized


@contextlib.contextmanager
def pooled_logits(head: nn.Module | None, alloc: Allocator | None) -> Iterator[None]:
    """For one forward: ``head`` writes its output into ``alloc``'d memory (a no-op where unsupported).

    Not re-entrant, like :class:`eagle3_appliance.model.target.Target`: the model thread runs one
    forward at a time.
    """
    if alloc is None or head is None or not pooled_head_supported(head):
        yield
        return
    assert isinstance(head, nn.Linear)  # pooled_head_supported checked it
    weight = head.weight
    own_forward = head.forward

    def forward(x: torch.Tensor) -> Any:
        if x.dtype != weight.dtype or x.device != weight.device or x.dim() < 2:
            return own_forward(x)
        out = alloc((*x.shape[:-1], weight.shape[0]), x.dtype)
        return torch.matmul(x, weight.t(), out=out)

    head.forward = forward  # type: ignore[method-assign, assignment]
    try:
        yield
    finally:
        del head.forward  # the class's forward again
