"""Reusable tensor memory whose reuse is safe by construction.

Why: a 2048-token answer for an 8B target is ~300 MB. Writing into freshly allocated
memory costs a page fault per 4 KiB page (about 1.3 GB/s on our test machines, against
~26 GB/s into memory that was touched before), and the glibc allocator returns such large
blocks to the kernel on free, so every request pays the faults again. A pool keeps the
blocks and hands them out again.

The contract (what makes reuse safe): the pool hands out a block only when nobody else
holds it. A block is a :class:`torch.UntypedStorage`; every tensor made from it (and every
view of such a tensor, and every keep-alive byte view from :func:`eagle3_client.wire.tensor_bytes`)
holds a reference to the storage, and the pool reuses a block only when its use count is 1,
i.e. the pool's own reference is the last one. The tensor that takes the second reference is
made under the pool's lock, so choosing a free block and owning it are one step: two threads
asking at once never get the same block. So:

* a trainer that keeps a batch keeps its memory: the pool allocates another block;
* a server whose response is still being written (the transport holds byte views of the
  tensors) never sees the next forward overwrite it;
* dropping every reference returns the block to the pool, without any explicit release.

The pool caches at most ``max_bytes``; beyond that it allocates ordinary tensors that are
freed normally. Without the use-count query (a private torch API) it never reuses anything.

Usage::

    pool = BufferPool(max_bytes=2 << 30, pin_memory=torch.cuda.is_available())
    out = pool.empty((2048, 32768), torch.float32)   # reused memory once warm
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from eagle3_client.options import ClientOptions

__all__ = ["BufferPool", "PoolStats", "reuse_supported"]

DEFAULT_POOL_BYTES = ClientOptions().buffer_pool_bytes  # the buffer_pool_mb option's default (2 GiB)

_use_count = getattr(torch._C, "_storage_Use_Count", None)


def reuse_supported() -> bool:
    """Whether this torch can tell that a storage is unreferenced (else the pool never reuses)."""
    return _use_count is not None


def _unreferenced(storage: torch.UntypedStorage) -> bool:
    return _use_count is not None and _use_count(storage._cdata) == 1


@dataclass
class PoolStats:
    """Counters of one pool: reuses, new blocks, and the bytes it holds on to."""

    hits: int = 0
    misses: int = 0
    cached_bytes: int = 0
    uncached_allocations: int = 0


class BufferPool:
    """Blocks of memory, keyed by exact size, reused once unreferenced (see the module doc).

    **Parameters:**

    * ``max_bytes`` - most bytes the pool keeps; 0 turns reuse off.
    * ``pin_memory`` - allocate page-locked host memory (for fast, async-capable CUDA copies).
    * ``device`` - where blocks live (``cpu`` by default; a CUDA device works too).

    Thread-safe: one pool may serve several receiving threads.
    """

    def __init__(
        self, max_bytes: int = DEFAULT_POOL_BYTES, *, pin_memory: bool = False, device: torch.device | str = "cpu"
    ) -> None:
        self.max_bytes = max(0, int(max_bytes))
        self.device = torch.device(device)
        self.pin_memory = bool(pin_memory) and self.device.type == "cpu"
        self.stats = PoolStats()
        self._blocks: dict[int, list[torch.UntypedStorage]] = {}
        self._lock = threading.Lock()

    def empty(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised contiguous tensor, on reused memory when a free block fits exactly."""
        shape = tuple(int(d) for d in shape)
        numel = 1
        for d in shape:
            numel *= d
        nbytes = numel * torch.empty(0, dtype=dtype).element_size()
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype, device=self.device)
        out = torch.empty(0, dtype=dtype, device=self.device)
        with self._lock:
            # The tensor is made under the lock: its reference is what marks the block in use
            # (use count 2), so no other thread can find the block free between choice and use.
            out.set_(self._take(nbytes), 0, shape)  # type: ignore[call-overload]  # torch's stub lacks (UntypedStorage, offset, size)
        return out

    def _take(self, nbytes: int) -> torch.UntypedStorage:
        """A free cached block of ``nbytes``, or a new one; the caller holds the lock and must
        reference the block before releasing it."""
        blocks = self._blocks.setdefault(nbytes, [])
        for i, block in enumerate(blocks):
            if _unreferenced(block):
                blocks.append(blocks.pop(i))  # most recently used last
                self.stats.hits += 1
                return block
        self.stats.misses += 1
        block = self._allocate(nbytes)
        if reuse_supported() and self._make_room(nbytes):
            blocks.append(block)
            self.stats.cached_bytes += nbytes
        else:
            self.stats.uncached_allocations += 1
        return block

    def _allocate(self, nbytes: int) -> torch.UntypedStorage:
        return torch.empty(nbytes, dtype=torch.uint8, device=self.device, pin_memory=self.pin_memory).untyped_storage()

    def _make_room(self, nbytes: int) -> bool:
        """Drop unreferenced blocks of other sizes until ``nbytes`` more fit under ``max_bytes``."""
        if nbytes > self.max_bytes:
            return False
        for size, blocks in list(self._blocks.items()):
            if self.stats.cached_bytes + nbytes <= self.max_bytes:
                break
            for block in [b for b in blocks if _unreferenced(b)]:
                blocks.remove(block)
                self.stats.cached_bytes -= size
                if self.stats.cached_bytes + nbytes <= self.max_bytes:
                    break
        return self.stats.cached_bytes + nbytes <= self.max_bytes

    def clear(self) -> None:
        """Forget every block (tensors still using one keep it alive)."""
        with self._lock:
            self._blocks.clear()
            self.stats.cached_bytes = 0
