"""BufferPool hands memory out again only when nothing references it."""

from __future__ import annotations

import gc
import sys
import threading
import time

import pytest
import torch

from eagle3_client.transports.buffers import BufferPool, reuse_supported
from eagle3_client.wire import tensor_bytes

pytestmark = pytest.mark.skipif(not reuse_supported(), reason="this torch cannot report storage use counts")


def test_a_dropped_tensor_is_reused_and_a_held_one_is_not():
    pool = BufferPool(1 << 20)
    a = pool.empty((16, 16), torch.float32)
    a_ptr = a.data_ptr()
    b = pool.empty((16, 16), torch.float32)
    assert b.data_ptr() != a_ptr  # `a` is still held
    del a
    c = pool.empty((16, 16), torch.float32)
    assert c.data_ptr() == a_ptr
    assert (pool.stats.hits, pool.stats.misses) == (1, 2)


def test_views_and_wire_byte_views_keep_a_block_in_use():
    pool = BufferPool(1 << 20)
    t = pool.empty((8, 8), torch.float32)
    ptr = t.data_ptr()
    row = t[3]
    data = tensor_bytes(t)[4:12]  # a slice of the send path's byte view
    del t
    assert pool.empty((8, 8), torch.float32).data_ptr() != ptr  # the view holds it
    del row
    gc.collect()
    assert pool.empty((8, 8), torch.float32).data_ptr() != ptr  # the byte view holds it
    del data
    assert pool.empty((8, 8), torch.float32).data_ptr() == ptr


def test_a_block_is_reused_for_another_dtype_of_the_same_size():
    pool = BufferPool(1 << 20)
    ptr = pool.empty((4, 4), torch.float32).data_ptr()  # dropped at once
    again = pool.empty((4, 8), torch.int16)  # also 64 bytes
    assert again.data_ptr() == ptr and again.shape == (4, 8) and again.dtype == torch.int16


def test_the_cap_bounds_cached_memory_and_evicts_free_blocks_of_other_sizes():
    pool = BufferPool(1000)
    held = pool.empty((200,), torch.float32)  # 800 bytes, cached
    extra = pool.empty((100,), torch.float32)  # 400 more would exceed 1000: not cached
    assert pool.stats.cached_bytes == 800 and pool.stats.uncached_allocations == 1
    del extra, held
    small = pool.empty((75,), torch.float32)  # 300 bytes: only fit if the free 800-byte block goes
    assert pool.stats.cached_bytes == 300
    assert small.numel() == 75


def test_zero_cap_never_reuses():
    pool = BufferPool(0)
    for _ in range(3):
        pool.empty((64,), torch.float32).fill_(1)
    assert pool.stats.hits == 0 and pool.stats.cached_bytes == 0 and pool.stats.uncached_allocations == 3


def _hand_out_concurrently(pool: BufferPool, threads: int, rounds: int) -> tuple[list[str], int]:
    """Each thread takes a block, fills it with its own pattern, lets others run, then checks it.

    Returns what went wrong (a block live in two threads, a pattern overwritten) and how many
    blocks were handed out in all.
    """
    live: dict[int, int] = {}  # data_ptr -> the thread holding it now
    live_lock = threading.Lock()
    problems: list[str] = []
    start = threading.Barrier(threads)

    def work(me: int) -> None:
        start.wait()
        for i in range(rounds):
            t = pool.empty((64,), torch.int64)
            ptr = t.data_ptr()
            with live_lock:
                other = live.get(ptr)
                live[ptr] = me
            if other is not None:
                problems.append(f"round {i}: block {ptr:#x} handed to thread {me} while thread {other} held it")
            pattern = me * rounds + i
            t.fill_(pattern)
            time.sleep(0)  # let the other threads take blocks while this one is held
            if not bool((t == pattern).all()):
                problems.append(f"round {i}: thread {me}'s tensor was overwritten with {sorted(set(t.tolist()))[:4]}")
            with live_lock:
                if live.get(ptr) == me:
                    del live[ptr]
            del t

    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: the race window is a few bytecodes
    try:
        workers = [threading.Thread(target=work, args=(n,)) for n in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(timeout=120)
        assert not any(w.is_alive() for w in workers)
    finally:
        sys.setswitchinterval(previous)
    return problems, pool.stats.hits + pool.stats.misses


def test_no_block_is_handed_to_two_threads_at_once():
    """Many receiving threads on one pool (the client's fleet, the server's model and send paths):
    a block is owned before the pool's lock is released, so a second thread never sees it free."""
    pool = BufferPool(1 << 20)
    problems, handed_out = _hand_out_concurrently(pool, threads=12, rounds=1500)
    assert handed_out == 12 * 1500
    assert problems == [], f"{len(problems)} double hand-outs, first: {problems[:3]}"
    assert pool.stats.hits > 0  # blocks were reused, so the race had its chance
