"""The binary tensor-dictionary wire format (upstream-protocol.md §3), both directions.

Layout, little-endian, no padding::

    u32 magic 0x4E4D4554
    per entry: u32 key_len, key, u8 flags (bit 0 = None),
               u8 dtype_code, u8 ndim, ndim x i64 shape, u64 nbytes, nbytes of data

Why it is shaped like this:

* **Sending** never concatenates: :func:`encode_parts` returns the small entry headers and
  zero-copy memoryviews of each tensor's own memory, in order, so a server can write them
  to the socket one after another (header, then the tensor's bytes).
* **Receiving** goes through :class:`WireReader`, an incremental parser that allocates each
  tensor once (properly aligned: its own block from ``torch.empty`` or a
  :class:`eagle3_client.transports.buffers.BufferPool`) as soon as its header is known. Pushed chunks
  (:meth:`WireReader.feed`) are copied straight into it; a socket can also *pull*
  (:meth:`WireReader.read_from`): the parser names the tensor memory the next bytes belong
  in and the socket's ``recv_into`` writes them there, so the kernel's copy is the only one.
  There is no whole-body buffer, no per-chunk join and no per-tensor copy afterwards;
  :func:`decode` is the same parser fed one buffer.
* Malformed input raises :class:`WireFormatError` with a message that says what is wrong,
  and a declared size is checked against the bytes that can still arrive *before* anything
  is allocated, so a hostile header cannot make the receiver allocate gigabytes. A receiver
  that knows how many entries a body may have passes ``max_entries``: without it, a body of
  many tiny entries costs a Python object per few bytes (the server passes its bound).
"""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Callable, Mapping, Sequence

import torch

__all__ = [
    "CODE_TO_DTYPE",
    "DTYPE_TO_CODE",
    "MAGIC",
    "WireFormatError",
    "WireReader",
    "decode",
    "encode",
    "encode_parts",
    "encoded_size",
    "entry_header",
    "magic_bytes",
    "tensor_bytes",
]

MAGIC = 0x4E4D4554

CODE_TO_DTYPE: dict[int, torch.dtype] = {
    0: torch.float32,
    1: torch.float64,
    2: torch.float16,
    3: torch.bfloat16,
    4: torch.int64,
    5: torch.int32,
    6: torch.int16,
    7: torch.int8,
    8: torch.uint8,
    9: torch.bool,
}
DTYPE_TO_CODE: dict[torch.dtype, int] = {dtype: code for code, dtype in CODE_TO_DTYPE.items()}

_MAGIC = struct.Struct("<I")
_KEY_LEN = struct.Struct("<I")
_FLAGS_DTYPE_NDIM = struct.Struct("<BBB")
_DIM = struct.Struct("<q")
_NBYTES = struct.Struct("<Q")
_FLAG_NONE = 0x01
_MAX_KEY_LEN = 4096
# The longest valid entry header: key_len, key, flags/dtype/ndim, 255 dims, nbytes.
_MAX_HEADER = _KEY_LEN.size + _MAX_KEY_LEN + _FLAGS_DTYPE_NDIM.size + 255 * _DIM.size + _NBYTES.size

# Largest element count x item size any shape may describe (torch's own storage limit), so
# that even a zero-byte entry with dimensions like [2**40, 2**40, 0] is refused by name.
_MAX_STORAGE = 2**63 - 1

# Bytes a pulling reader asks for while it parses entry headers; tensor data that arrives
# in the same read is copied once into its tensor, which is cheap for this bounded amount.
_HEADER_READ = 64 * 1024

TensorDict = Mapping[str, "torch.Tensor | None"]
Allocator = Callable[[Sequence[int], torch.dtype], torch.Tensor]


class WireFormatError(ValueError):
    """A body that is not a valid wire blob (bad magic, dtype, sizes or truncation)."""


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor's memory, without copying.

    The view (and every slice of it) keeps the tensor alive. That matters for sending:
    an event-loop transport (uvloop) queues the views it could not write yet instead of
    copying them, so the memory must outlive the handler that passed them in; and it is
    what tells a :class:`eagle3_client.transports.buffers.BufferPool` that the memory is still in use.
    """
    if tensor.device.type != "cpu":
        raise ValueError(f"wire data must be on the CPU, got a tensor on {tensor.device}")
    if not tensor.is_contiguous():
        raise ValueError("wire data must be contiguous")
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes == 0:
        return memoryview(bytearray(0))
    array = (ctypes.c_char * nbytes).from_address(tensor.data_ptr())
    array._owner = tensor  # type: ignore[attr-defined]  # the view's buffer holds the tensor
    return memoryview(array).cast("B")


def magic_bytes() -> bytes:
    """The blob's first bytes (a sender that writes entries as they become final starts with these)."""
    return _MAGIC.pack(MAGIC)


def entry_header(key: str, tensor: torch.Tensor | None) -> bytes:
    """One entry's header: key, dtype, shape and byte count (only metadata: a ``meta`` tensor will do)."""
    key_bytes = key.encode("utf-8")
    head = _KEY_LEN.pack(len(key_bytes)) + key_bytes
    if tensor is None:
        return head + bytes([_FLAG_NONE])
    code = DTYPE_TO_CODE.get(tensor.dtype)
    if code is None:
        raise TypeError(f"dtype {tensor.dtype} of {key!r} has no wire code")
    if tensor.ndim > 255:
        raise ValueError(f"{key!r} has {tensor.ndim} dimensions; the wire format allows 255")
    dims = b"".join(_DIM.pack(d) for d in tensor.shape)
    nbytes = tensor.numel() * tensor.element_size()
    return head + _FLAGS_DTYPE_NDIM.pack(0, code, tensor.ndim) + dims + _NBYTES.pack(nbytes)


def encode_parts(tensors: TensorDict) -> tuple[list[memoryview | bytes], int]:
    """Return the blob as an ordered list of parts, and its total length.

    Tensor parts are views of the tensors' own memory (they must be CPU and contiguous and
    must stay alive until the parts are written).
    """
    parts: list[memoryview | bytes] = [magic_bytes()]
    total = _MAGIC.size
    for key, tensor in tensors.items():
        header = entry_header(key, tensor)
        parts.append(header)
        total += len(header)
        if tensor is not None:
            data = tensor_bytes(tensor)
            if data.nbytes:
                parts.append(data)
                total += data.nbytes
    return parts, total


def encoded_size(tensors: TensorDict) -> int:
    """Bytes that :func:`encode` would produce, without touching tensor data."""
    total = _MAGIC.size
    for key, tensor in tensors.items():
        total += len(entry_header(key, tensor))
        if tensor is not None:
            total += tensor.numel() * tensor.element_size()
    return total


def encode(tensors: TensorDict) -> bytes:
    """The whole blob as one ``bytes`` (for small control-plane bodies)."""
    host = {k: _cpu_contiguous(v) for k, v in tensors.items()}  # keeps copies alive while joined
    parts, _ = encode_parts(host)
    return b"".join(parts)


def _cpu_contiguous(tensor: torch.Tensor | None) -> torch.Tensor | None:
    if tensor is None:
        return None
    return tensor.detach().to("cpu").contiguous()


class WireReader:
    """Incremental wire-format parser that writes each tensor's bytes into its final storage.

    Feed it chunks in order with :meth:`feed`; :meth:`finish` returns the tensors once the
    body has ended exactly at an entry boundary. Or let it pull from a socket with
    :meth:`read_from`, which receives tensor data straight into the tensors.
    ``expected_size`` (the Content-Length, when known) bounds every allocation;
    ``max_entries`` bounds the number of entries (None = any);
    ``pin_memory`` allocates page-locked storage so that the caller's one copy to a CUDA
    device is fast; ``alloc`` (e.g. ``BufferPool.empty``) supplies each tensor's memory
    instead of ``torch.empty``.

    Usage::

        reader = WireReader(expected_size=len(body))
        reader.feed(body)
        tensors = reader.finish()

        tensors = WireReader(expected_size=n, alloc=pool.empty).read_from(sock.recv_into)
    """

    def __init__(
        self,
        expected_size: int | None = None,
        *,
        pin_memory: bool = False,
        alloc: Allocator | None = None,
        max_entries: int | None = None,
    ) -> None:
        self._expected = expected_size
        self._max_entries = max_entries
        self._pin = pin_memory
        self._alloc = alloc
        self._scratch: memoryview | None = None  # header bytes read by read_from
        self._lent_dest = False  # whether next_buffer's last answer was tensor memory
        self._seen = 0  # bytes fed so far
        self._offset = 0  # stream position of _pending[0]: everything before it is consumed
        self._pending = bytearray()  # unparsed header bytes (bounded by _MAX_HEADER)
        self._magic_ok = False
        self._result: dict[str, torch.Tensor | None] = {}
        self._dest: memoryview | None = None  # the tensor being filled
        self._dest_pos = 0

    @property
    def bytes_received(self) -> int:
        return self._seen

    def feed(self, chunk: bytes | bytearray | memoryview) -> None:
        view = memoryview(chunk).cast("B")
        self._seen += view.nbytes
        if self._expected is not None and self._seen > self._expected:
            raise WireFormatError(f"body is longer than its declared {self._expected} bytes")
        while view.nbytes:
            if self._dest is not None:
                view = self._fill(view)
                continue
            # Only header bytes are buffered, a bounded amount at a time; tensor data that
            # follows a header is moved straight into its tensor by _parse_headers.
            step = min(view.nbytes, _MAX_HEADER)
            self._pending += view[:step]
            view = view[step:]
            self._parse_headers()

    def next_buffer(self) -> memoryview:
        """Where the next received bytes go: the current tensor's unfilled memory, else scratch.

        Never longer than what is left of a body of known size, so a keep-alive reader
        cannot run into the next response. Report how much was written with :meth:`commit`.
        """
        if self._dest is not None:
            view, self._lent_dest = self._dest[self._dest_pos :], True
        else:
            if self._scratch is None:
                self._scratch = memoryview(bytearray(_HEADER_READ))
            view, self._lent_dest = self._scratch, False
        if self._expected is not None:
            view = view[: max(0, self._expected - self._seen)]
        return view

    def commit(self, nbytes: int) -> None:
        """Account for ``nbytes`` written at the start of the last :meth:`next_buffer`."""
        if nbytes <= 0:
            return
        if not self._lent_dest:
            assert self._scratch is not None
            self.feed(self._scratch[:nbytes])
            return
        assert self._dest is not None
        self._seen += nbytes
        self._dest_pos += nbytes
        self._offset += nbytes
        if self._dest_pos == self._dest.nbytes:
            self._dest = None

    def read_from(self, readinto: Callable[[memoryview], int]) -> dict[str, torch.Tensor | None]:
        """Pull the whole body with ``readinto`` (e.g. ``socket.recv_into``; 0 = end) and finish."""
        while self._expected is None or self._seen < self._expected:
            view = self.next_buffer()
            nbytes = readinto(view)
            if not nbytes:
                break
            self.commit(nbytes)
        return self.finish()

    def _fill(self, view: memoryview) -> memoryview:
        assert self._dest is not None
        take = min(view.nbytes, self._dest.nbytes - self._dest_pos)
        self._dest[self._dest_pos : self._dest_pos + take] = view[:take]
        self._dest_pos += take
        self._offset += take
        if self._dest_pos == self._dest.nbytes:
            self._dest = None
        return view[take:]

    def _parse_headers(self) -> None:
        """Parse complete entry headers from ``_pending``; start filling a tensor if one is due."""
        buf = self._pending
        while self._dest is None and buf:
            if not self._magic_ok:
                if len(buf) < _MAGIC.size:
                    return
                (magic,) = _MAGIC.unpack_from(buf, 0)
                if magic != MAGIC:
                    raise WireFormatError(f"bad magic 0x{magic:08x}, expected 0x{MAGIC:08x}")
                self._magic_ok = True
                del buf[: _MAGIC.size]
                self._offset += _MAGIC.size
                continue
            entry = self._try_entry_header(buf)
            if entry is None:
                if len(buf) >= _MAX_HEADER:
                    raise WireFormatError("entry header is longer than any valid header")
                return
            used, key, tensor = entry
            del buf[:used]
            self._offset += used
            self._result[key] = tensor
            if tensor is None or tensor.numel() == 0:
                continue
            self._dest, self._dest_pos = tensor_bytes(tensor), 0
            if buf:
                leftover = memoryview(bytes(buf))
                buf.clear()
                buf += self._fill(leftover)

    def _try_entry_header(self, buf: bytearray) -> tuple[int, str, torch.Tensor | None] | None:
        pos = 0
        if len(buf) < _KEY_LEN.size:
            return None
        (key_len,) = _KEY_LEN.unpack_from(buf, pos)
        if key_len > _MAX_KEY_LEN:
            raise WireFormatError(f"key length {key_len} exceeds {_MAX_KEY_LEN}")
        pos += _KEY_LEN.size
        if len(buf) < pos + key_len + 1:
            return None
        try:
            key = bytes(buf[pos : pos + key_len]).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise WireFormatError(f"key is not UTF-8: {exc}") from None
        if key in self._result:
            raise WireFormatError(f"duplicate key {key!r}")
        if self._max_entries is not None and len(self._result) >= self._max_entries:
            raise WireFormatError(f"body has more than {self._max_entries} entries, the most this receiver accepts")
        pos += key_len
        flags = buf[pos]
        if flags & _FLAG_NONE:
            return pos + 1, key, None
        if len(buf) < pos + _FLAGS_DTYPE_NDIM.size:
            return None
        _, code, ndim = _FLAGS_DTYPE_NDIM.unpack_from(buf, pos)
        pos += _FLAGS_DTYPE_NDIM.size
        dtype = CODE_TO_DTYPE.get(code)
        if dtype is None:
            raise WireFormatError(f"unknown dtype code {code} for {key!r}")
        if len(buf) < pos + ndim * _DIM.size + _NBYTES.size:
            return None
        shape = [_DIM.unpack_from(buf, pos + i * _DIM.size)[0] for i in range(ndim)]
        pos += ndim * _DIM.size
        (nbytes,) = _NBYTES.unpack_from(buf, pos)
        pos += _NBYTES.size
        if any(d < 0 for d in shape):
            raise WireFormatError(f"negative dimension in shape {shape} of {key!r}")
        numel, storage = 1, 1
        itemsize = torch.empty(0, dtype=dtype).element_size()
        for d in shape:
            numel *= d
            storage *= max(d, 1)
        if storage * itemsize > _MAX_STORAGE:
            raise WireFormatError(f"shape {shape} of {key!r} is too large to allocate, whatever its byte count")
        if nbytes != numel * itemsize:
            raise WireFormatError(
                f"{key!r}: {nbytes} data bytes do not match shape {shape} of {dtype} ({numel * itemsize} bytes)"
            )
        remaining = None if self._expected is None else self._expected - self._offset - pos
        if remaining is not None and nbytes > remaining:
            raise WireFormatError(f"{key!r} declares {nbytes} bytes but the body ends {remaining} bytes later")
        if self._alloc is not None:
            tensor = self._alloc(shape, dtype)
        else:
            tensor = torch.empty(shape, dtype=dtype, pin_memory=self._pin)
        return pos, key, tensor

    def finish(self) -> dict[str, torch.Tensor | None]:
        """The decoded tensors; raises if the body ended inside an entry."""
        if not self._magic_ok:
            raise WireFormatError("body ends before the 4-byte magic")
        if self._dest is not None or self._pending:
            raise WireFormatError("body ends inside an entry (truncated)")
        if self._expected is not None and self._seen != self._expected:
            raise WireFormatError(f"body has {self._seen} bytes, declared {self._expected}")
        for key, tensor in self._result.items():
            if tensor is not None and tensor.dtype == torch.bool and tensor.numel():
                if int(tensor.view(torch.uint8).max()) > 1:
                    raise WireFormatError(f"bool tensor {key!r} holds bytes other than 0 and 1")
        return self._result


def decode(body: bytes | bytearray | memoryview, *, max_entries: int | None = None) -> dict[str, torch.Tensor | None]:
    """Decode a complete blob into tensors that own their (aligned) memory (at most ``max_entries`` of them)."""
    reader = WireReader(expected_size=memoryview(body).nbytes, max_entries=max_entries)
    reader.feed(body)
    return reader.finish()
