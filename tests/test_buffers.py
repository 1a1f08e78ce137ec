"""BufferPool hands memory out again only when nothing references it."""

from __future__ import annotations

import gc

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
