"""The wire codec against protocol §3: golden bytes, round-trips, streaming, malformed input."""

from __future__ import annotations

import struct

import pytest
import torch

from eagle3_client import wire

ALL_DTYPES = list(wire.DTYPE_TO_CODE)


def sample(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(max(info.min, -1000), min(info.max, 1000), shape, generator=g, dtype=torch.int64).to(dtype)


def test_golden_bytes_match_the_protocol_layout() -> None:
    blob = wire.encode({"ab": torch.tensor([[1, 2, 3]], dtype=torch.int32), "n": None})
    expected = (
        bytes([0x54, 0x45, 0x4D, 0x4E])  # magic 0x4E4D4554, little-endian
        + struct.pack("<I", 2)
        + b"ab"
        + bytes([0, 5, 2])  # flags, dtype code 5 = int32, ndim
        + struct.pack("<qq", 1, 3)
        + struct.pack("<Q", 12)
        + struct.pack("<iii", 1, 2, 3)
        + struct.pack("<I", 1)
        + b"n"
        + bytes([1])  # flags: None
    )
    assert blob == expected


def test_dtype_codes_are_the_protocol_table() -> None:
    assert [wire.CODE_TO_DTYPE[c] for c in range(10)] == [
        torch.float32,
        torch.float64,
        torch.float16,
        torch.bfloat16,
        torch.int64,
        torch.int32,
        torch.int16,
        torch.int8,
        torch.uint8,
        torch.bool,
    ]


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(), (0,), (7,), (2, 3, 5), (1, 0, 4)])
def test_round_trip_every_dtype_and_shape(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    tensor = sample(dtype, shape)
    out = wire.decode(wire.encode({"x": tensor, "none": None}))
    assert list(out) == ["x", "none"]
    assert out["none"] is None
    assert out["x"].dtype == dtype and out["x"].shape == tensor.shape
    assert torch.equal(out["x"], tensor)


@pytest.mark.parametrize("chunk", [1, 3, 17, 4096, 1 << 20])
def test_streaming_reader_any_chunking_gives_the_same_tensors(chunk: int) -> None:
    tensors = {f"t{i}": sample(d, (3, 41), seed=i) for i, d in enumerate(ALL_DTYPES)}
    blob = wire.encode(tensors)
    reader = wire.WireReader(expected_size=len(blob))
    for start in range(0, len(blob), chunk):
        reader.feed(blob[start : start + chunk])
    out = reader.finish()
    assert list(out) == list(tensors)
    for key, tensor in tensors.items():
        assert torch.equal(out[key], tensor)
        assert out[key].data_ptr() % out[key].element_size() == 0  # own, aligned storage


def test_encode_parts_are_views_of_tensor_memory() -> None:
    tensor = torch.arange(1000, dtype=torch.float32)
    parts, total = wire.encode_parts({"x": tensor})
    assert total == sum(memoryview(p).nbytes for p in parts) == wire.encoded_size({"x": tensor})
    tensor[0] = 42.0  # the data part is the tensor's memory, not a copy
    assert struct.unpack_from("<f", parts[-1], 0)[0] == 42.0


def test_non_contiguous_and_non_cpu_inputs() -> None:
    t = torch.arange(12.0).reshape(3, 4).t()
    assert torch.equal(wire.decode(wire.encode({"t": t}))["t"], t)
    with pytest.raises(ValueError, match="contiguous"):
        wire.encode_parts({"t": t})


def _entry(key: bytes, code: int, shape: list[int], nbytes: int, data: bytes = b"") -> bytes:
    return (
        struct.pack("<I", len(key))
        + key
        + bytes([0, code, len(shape)])
        + b"".join(struct.pack("<q", d) for d in shape)
        + struct.pack("<Q", nbytes)
        + data
    )


MAGIC = struct.pack("<I", wire.MAGIC)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "before the 4-byte magic"),
        (b"\x00\x01", "before the 4-byte magic"),
        (b"XXXX", "bad magic"),
        (MAGIC + _entry(b"x", 42, [1], 4, b"\0" * 4), "unknown dtype code 42"),
        (MAGIC + _entry(b"x", 0, [2], 8, b"\0" * 4), "declares 8 bytes but the body ends 4 bytes later"),
        (MAGIC + _entry(b"x", 0, [2], 12, b"\0" * 12), "do not match shape"),
        (MAGIC + _entry(b"x", 0, [-1], 0), "negative dimension"),
        (MAGIC + _entry(b"x", 0, [1 << 40], 4 << 40), "declares"),
        (MAGIC + _entry(b"x", 0, [1], 4, b"\0" * 4) + _entry(b"x", 0, [1], 4, b"\0" * 4), "duplicate key"),
        (MAGIC + struct.pack("<I", 3) + b"\xff\xfe\xfd" + b"\x01", "not UTF-8"),
        (MAGIC + struct.pack("<I", 1 << 30), "key length"),
        (MAGIC + _entry(b"m", 9, [2], 2, b"\x01\x07"), "bool tensor"),
        (MAGIC + struct.pack("<I", 1) + b"x", "truncated"),
    ],
)
def test_malformed_bodies_are_rejected_with_a_reason(body: bytes, message: str) -> None:
    with pytest.raises(wire.WireFormatError, match=message):
        wire.decode(body)


def test_truncated_stream_of_unknown_length_is_rejected_at_finish() -> None:
    blob = wire.encode({"x": torch.ones(4)})
    reader = wire.WireReader()
    reader.feed(blob[:-3])
    with pytest.raises(wire.WireFormatError, match="inside an entry"):
        reader.finish()


def test_body_longer_than_declared_is_rejected() -> None:
    blob = wire.encode({"x": torch.ones(2)})
    reader = wire.WireReader(expected_size=len(blob) - 1)
    with pytest.raises(wire.WireFormatError, match="longer than"):
        reader.feed(blob)


def test_a_receiver_can_bound_the_number_of_entries() -> None:
    body = wire.encode({f"k{i}": torch.zeros(1) for i in range(5)})
    assert len(wire.decode(body)) == 5 and len(wire.decode(body, max_entries=5)) == 5
    with pytest.raises(wire.WireFormatError, match="body has more than 4 entries, the most this receiver accepts"):
        wire.decode(body, max_entries=4)


def test_a_zero_byte_entry_with_an_overflowing_shape_is_refused_by_name() -> None:
    dims = b"".join(struct.pack("<q", d) for d in (2**40, 2**40, 0))
    entry = struct.pack("<I", 1) + b"x" + struct.pack("<BBB", 0, 0, 3) + dims + struct.pack("<Q", 0)
    with pytest.raises(wire.WireFormatError, match=r"shape \[1099511627776, 1099511627776, 0\] of 'x' is too large"):
        wire.decode(struct.pack("<I", wire.MAGIC) + entry)
    assert wire.decode(wire.encode({"x": torch.zeros(0, 2**20)}))["x"].shape == (0, 2**20)  # empty but sane: fine
