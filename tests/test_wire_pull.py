"""WireReader: pulled (recv_into) and pushed bodies decode exactly, at any chunking and alignment."""

from __future__ import annotations

import random

import pytest
import torch

from eagle3_client import wire
from eagle3_client.transports.buffers import BufferPool


def _blob_tensors() -> dict[str, torch.Tensor | None]:
    g = torch.Generator().manual_seed(0)
    # Odd key lengths and odd-sized tensors put every tensor's data at an unaligned stream offset.
    return {
        "a": torch.randn(3, 5, generator=g),
        "bb": torch.randn(7, generator=g).to(torch.bfloat16),
        "ccc": torch.randint(0, 2, (3, 1), generator=g).bool(),
        "none": None,
        "dddd": torch.randint(-(2**40), 2**40, (5,), generator=g),
        "empty": torch.empty(0, 4),
        "e": torch.randint(-100, 100, (9,), generator=g).to(torch.int16),
        "f" * 13: torch.randn(1000, 33, generator=g).to(torch.float64),
        "gg": torch.randint(0, 255, (17,), generator=g).to(torch.uint8),
    }


def _check(got: dict[str, torch.Tensor | None], want: dict[str, torch.Tensor | None]) -> None:
    assert list(got) == list(want)
    for key, expected in want.items():
        actual = got[key]
        if expected is None:
            assert actual is None
            continue
        assert actual is not None and actual.dtype == expected.dtype and actual.shape == expected.shape
        assert torch.equal(actual, expected), key
        if actual.numel():
            assert actual.data_ptr() % 64 == 0, f"{key} is not aligned"


class _Trickle:
    """A fake socket that delivers the body in random-sized pieces through recv_into."""

    def __init__(self, body: bytes, seed: int, max_piece: int) -> None:
        self.body = memoryview(body)
        self.pos = 0
        self.rng = random.Random(seed)
        self.max_piece = max_piece
        self.calls = 0

    def recv_into(self, view: memoryview) -> int:
        self.calls += 1
        n = min(view.nbytes, self.rng.randint(1, self.max_piece), len(self.body) - self.pos)
        view[:n] = self.body[self.pos : self.pos + n]
        self.pos += n
        return n


@pytest.mark.parametrize("chunk", [1, 3, 7, 64, 4096, 1 << 20])
def test_pushed_chunks_decode_exactly(chunk: int):
    tensors = _blob_tensors()
    body = wire.encode(tensors)
    reader = wire.WireReader(expected_size=len(body))
    for start in range(0, len(body), chunk):
        reader.feed(body[start : start + chunk])
    _check(reader.finish(), tensors)


@pytest.mark.parametrize(("seed", "max_piece"), [(0, 1), (1, 5), (2, 100), (3, 70000), (4, 1 << 30)])
@pytest.mark.parametrize("pooled", [False, True])
def test_pulled_body_decodes_exactly(seed: int, max_piece: int, pooled: bool):
    tensors = _blob_tensors()
    body = wire.encode(tensors)
    pool = BufferPool() if pooled else None
    reader = wire.WireReader(expected_size=len(body), alloc=pool.empty if pool else None)
    sock = _Trickle(body, seed, max_piece)
    _check(reader.read_from(sock.recv_into), tensors)
    assert sock.pos == len(body)


def test_pulled_large_tensor_is_received_in_place_not_through_scratch():
    big = torch.arange(1 << 20, dtype=torch.float32)
    body = wire.encode({"big": big})
    sock = _Trickle(body, seed=0, max_piece=1 << 30)
    got = wire.WireReader(expected_size=len(body)).read_from(sock.recv_into)
    assert torch.equal(got["big"], big)
    # One read for the magic, the header and the first 64 KiB of data, one for the rest.
    assert sock.calls == 2


def test_pulled_reader_without_length_stops_at_end_of_stream():
    tensors = _blob_tensors()
    body = wire.encode(tensors)
    _check(wire.WireReader().read_from(_Trickle(body, 5, 999).recv_into), tensors)


def test_truncated_pulled_body_is_malformed():
    body = wire.encode(_blob_tensors())
    truncated = body[:-10]
    with pytest.raises(wire.WireFormatError, match="truncated|declared"):
        wire.WireReader(expected_size=len(body)).read_from(_Trickle(truncated, 0, 500).recv_into)
    with pytest.raises(wire.WireFormatError, match="truncated"):
        wire.WireReader().read_from(_Trickle(truncated, 0, 500).recv_into)


def test_pulled_reader_never_reads_past_its_declared_length():
    tensors = {"x": torch.arange(10)}
    body = wire.encode(tensors)
    sock = _Trickle(body + b"NEXT RESPONSE", 0, 1 << 20)
    got = wire.WireReader(expected_size=len(body)).read_from(sock.recv_into)
    assert torch.equal(got["x"], tensors["x"]) and sock.pos == len(body)
