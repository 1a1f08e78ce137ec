"""Private two-rank ``torch.distributed`` groups, and the framing of one transfer over them.

Both ends import this module (as they do :mod:`eagle3_client.wire`), so sender and receiver cannot
disagree about the framing. A group is built directly from its own ``TCPStore``: it never
touches ``torch.distributed``'s default group or registry, so a trainer's own process
groups are unaffected and tearing one down needs no cooperation from the peer.

Framing of transfer ``seq`` (the server is rank 0 and sends, the client is rank 1):

1. The HTTP answer carries the metadata (JSON): ``seq``, ``tier``, ``keys_order``,
   ``metadata`` (``{key: {"dtype_code", "shape"}}``, upstream's NCCL layout) and
   ``total_bytes``.
2. On the group: one int64 header tensor ``[TRANSFER_MAGIC, seq, n_tensors, total_bytes]``,
   then each non-empty tensor in ``keys_order`` as a flat ``uint8`` view of its own memory
   (no copy, any dtype, the same on NCCL and gloo).
3. The receiver compares the header with the metadata *before* it receives any tensor;
   a mismatch is :class:`TransferDesync`. Gloo messages are also tagged with the sequence
   number, so a stray message of another transfer can never be matched to this one.

Every wait has a deadline. Gloo honours a timeout on ``wait``; NCCL's ``wait`` only orders
CUDA streams, so NCCL work is polled until it completes or the deadline passes, and the
communicator is then aborted (a peer that vanished cannot hold a thread forever).

Joining (our own tiers): the rendezvous goes through a :class:`RendezvousStore`, which either
end can *detach* from its ``TCPStore``. Detaching closes a rank 0's store (its port is free
again) and ends any rendezvous wait at once. Because anyone who reaches a ``TCPStore`` can list
its keys, nothing in the store is secret: right after the group forms, the client proves that
it is the session's owner by sending the per-session secret of the ``POST /data_plane`` reply
on the group (:func:`send_proof`), and the server checks it (:func:`check_proof`) before it
sends anything, its hello included.
"""

from __future__ import annotations

import datetime
import hmac
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from eagle3_client import protocol, wire
from eagle3_client.errors import RemoteTargetError, first_line

__all__ = [
    "PROOF_BYTES",
    "Group",
    "JoinRejected",
    "RendezvousStore",
    "TransferDesync",
    "TransferError",
    "TransferMetadata",
    "TransferTimeout",
    "check_proof",
    "connect_store",
    "flat_bytes",
    "gloo_available",
    "host_store",
    "nccl_available",
    "open_group",
    "recv_transfer",
    "send_proof",
    "send_transfer",
    "tag_for",
    "wait_work",
]

_TAG_MODULUS = 2**31 - 1
# NCCL's own watchdog timeout is set well past our deadline so that our abort, not the
# watchdog (which may terminate the process), handles a stuck transfer.
_NCCL_WATCHDOG_MARGIN_S = 60.0
_POLL_S = 0.0002
_STORE_POLL_S = 0.01  # how often a rendezvous wait looks at the store (and notices a detach)
PROOF_BYTES = 32  # the per-session join secret: 256 random bits
_StoreBase: Any = dist.Store if dist.is_available() else object


class TransferError(RemoteTargetError):
    """A process-group transfer failed (peer gone, group broken); the group is unusable."""


class TransferTimeout(TransferError):
    """A transfer or rendezvous did not finish within the data-plane timeout."""


class TransferDesync(TransferError):
    """The header on the group does not match the transfer the HTTP answer described."""


class JoinRejected(TransferError):
    """The peer that joined the group did not prove to be the session's owner."""


def gloo_available() -> bool:
    return dist.is_available() and dist.is_gloo_available()


def nccl_available() -> bool:
    return dist.is_available() and dist.is_nccl_available() and torch.cuda.is_available()


def tag_for(seq: int) -> int:
    """The gloo tag of every message of transfer ``seq`` (NCCL ignores tags)."""
    return int(seq) % _TAG_MODULUS


def flat_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A 1-D ``uint8`` view of a contiguous tensor's memory (no copy)."""
    if not tensor.is_contiguous():
        raise ValueError("group transfers need contiguous tensors")
    return tensor.reshape(-1).view(torch.uint8)


def _delta(seconds: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=max(seconds, 0.001))


def host_store(
    host: str, port: int, timeout: float, *, multi_tenant: bool = False, wait_for_workers: bool = False
) -> Any:
    """Rank 0's rendezvous store, listening at once (``port`` 0 = the kernel picks one)."""
    from torch.distributed import TCPStore

    return TCPStore(
        host,
        port,
        world_size=2,
        is_master=True,
        timeout=_delta(timeout),
        wait_for_workers=wait_for_workers,
        multi_tenant=multi_tenant,
    )


def connect_store(host: str, port: int, timeout: float) -> Any:
    """Rank 1's connection to the peer's rendezvous store."""
    from torch.distributed import TCPStore

    return TCPStore(host, port, world_size=2, is_master=False, timeout=_delta(timeout))


class RendezvousStore(_StoreBase):
    """A ``torch.distributed.Store`` that forwards to a ``TCPStore`` until :meth:`detach`.

    Why: a process group keeps a reference to the store it was built from, so a rank 0's
    ``TCPStore`` (and its listening port) would live as long as the group, and a rendezvous
    waiting for a peer that never comes could not be ended before its timeout. Through this
    wrapper the store is dropped as soon as the group is up or the link is closed, and waits
    poll the store so that a detach ends them within milliseconds.

    Once detached, reads and waits fail at once, while ``check`` answers "not there" and
    ``set`` is dropped: a group's background threads (NCCL's monitor polls its store) then see
    nothing unusual.
    """

    def __init__(self, inner: Any = None, timeout: float = 60.0) -> None:
        super().__init__()
        self._inner = inner
        self._wait_s = timeout

    def attach(self, inner: Any) -> None:
        self._inner = inner

    def detach(self) -> None:
        """Drop the ``TCPStore``: a rank 0's closes its port; pending waits fail at once."""
        self._inner = None

    def _live(self) -> Any:
        inner = self._inner
        if inner is None:
            raise RuntimeError("the rendezvous store is closed")
        return inner

    def set(self, key: str, value: Any) -> None:
        inner = self._inner
        if inner is not None:
            inner.set(key, value)

    def get(self, key: str) -> bytes:
        self.wait([key])
        return bytes(self._live().get(key))

    def add(self, key: str, value: int) -> int:
        return int(self._live().add(key, value))

    def compare_set(self, key: str, expected: Any, desired: Any) -> bytes:
        return bytes(self._live().compare_set(key, expected, desired))

    def check(self, keys: list[str]) -> bool:
        inner = self._inner
        return inner is not None and bool(inner.check(keys))

    def delete_key(self, key: str) -> bool:
        return bool(self._live().delete_key(key))

    def num_keys(self) -> int:
        return int(self._live().num_keys())

    def set_timeout(self, timeout: datetime.timedelta) -> None:
        self._wait_s = timeout.total_seconds()

    def wait(self, keys: list[str], timeout: datetime.timedelta | None = None) -> None:
        limit = self._wait_s if timeout is None else timeout.total_seconds()
        deadline = time.monotonic() + limit
        while not self._live().check(keys):
            if time.monotonic() > deadline:
                raise RuntimeError(f"rendezvous: timed out after {limit:g} s waiting for the peer")
            time.sleep(_STORE_POLL_S)


@dataclass
class Group:
    """One end of a private two-rank group: the backend, its store and where its tensors live."""

    tier: str
    rank: int
    pg: Any
    store: Any
    device: torch.device
    timeout: float
    release: Any = None  # called once on close (e.g. to drop a group from torch's registry)

    @property
    def peer(self) -> int:
        return 1 - self.rank

    @property
    def closed(self) -> bool:
        return self.pg is None

    def close(self) -> None:
        """Drop this end. NCCL is aborted so that any op still queued fails instead of hanging;
        gloo's sockets close with the object, which makes the peer's pending ops fail."""
        pg, self.pg = self.pg, None
        if pg is not None and self.tier == protocol.TIER_NCCL:
            try:
                pg.abort()
            except Exception:  # noqa: BLE001 - already broken; nothing more to release
                pass
        store, self.store = self.store, None
        if store is not None and hasattr(store, "detach"):
            store.detach()
        release, self.release = self.release, None
        if pg is not None and release is not None:
            release(pg)


def open_group(
    tier: str, store: Any, rank: int, timeout: float, device: torch.device, *, key_prefix: str = ""
) -> Group:
    """Build this end of the group; blocks until the peer has joined (gloo) or returns at once (NCCL).

    ``key_prefix`` namespaces the store keys (a ``PrefixStore`` adds its own ``/``, so keys
    are ``"<key_prefix>/<key>"``). Our own tiers only: upstream's groups are built through
    torch's group helper, which nests two prefixes of its own (``"<group name>//cuda//<key>"``;
    see the appliance's ``upstream_nccl.upstream_group``). NCCL creates its communicator
    lazily on the first transfer.
    """
    from torch.distributed import PrefixStore

    backend_store = PrefixStore(key_prefix, store) if key_prefix else store
    pg: Any
    if tier == protocol.TIER_GLOO:
        from torch.distributed import ProcessGroupGloo

        pg = ProcessGroupGloo(backend_store, rank, 2, _delta(timeout))
        device = torch.device("cpu")
    elif tier == protocol.TIER_NCCL:
        from torch.distributed import ProcessGroupNCCL

        if device.type != "cuda":
            raise ValueError(f"an NCCL group needs a CUDA device, got {device}")
        torch.cuda.set_device(device)
        options = ProcessGroupNCCL.Options()
        options.is_high_priority_stream = False
        options._timeout = _delta(timeout + _NCCL_WATCHDOG_MARGIN_S)
        pg = ProcessGroupNCCL(backend_store, rank, 2, options)
    else:
        raise ValueError(f"no process group for tier {tier!r}")
    return Group(tier=tier, rank=rank, pg=pg, store=store, device=device, timeout=timeout)


def wait_work(group: Group, work: Any, deadline: float, what: str) -> None:
    """Wait for one op until ``deadline`` (monotonic); raise TransferTimeout or TransferError."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TransferTimeout(f"{group.tier} {what}: data-plane timeout of {group.timeout:g} s exceeded")
    if group.tier == protocol.TIER_GLOO:
        try:
            work.wait(_delta(remaining))
        except RuntimeError as exc:
            kind = TransferTimeout if "Timed out" in str(exc) else TransferError
            raise kind(f"gloo {what} failed: {first_line(exc)}") from None
        return
    while not work.is_completed():
        if time.monotonic() > deadline:
            group.close()
            raise TransferTimeout(f"nccl {what}: data-plane timeout of {group.timeout:g} s exceeded; group aborted")
        time.sleep(_POLL_S)
    try:
        work.wait()  # surfaces a failed op; orders the current CUDA stream after the transfer
    except RuntimeError as exc:
        raise TransferError(f"nccl {what} failed: {first_line(exc)}") from None


def _live(group: Group) -> Any:
    if group.pg is None:
        raise TransferError(f"the {group.tier} group is closed")
    if group.device.type == "cuda":
        torch.cuda.set_device(group.device)
    return group.pg


def send_proof(group: Group, nonce: int, secret: bytes, timeout: float) -> None:
    """The client's first message on a new group: the session's join secret (tagged with the nonce)."""
    if len(secret) != PROOF_BYTES:
        raise ValueError(f"a join secret has {PROOF_BYTES} bytes, got {len(secret)}")
    proof = torch.tensor(list(secret), dtype=torch.uint8, device=group.device)
    wait_work(group, _live(group).send([proof], group.peer, tag_for(nonce)), time.monotonic() + timeout, "join proof")


def check_proof(group: Group, nonce: int, secret: bytes, timeout: float) -> None:
    """The server's first step on a new group: receive the peer's secret; JoinRejected unless it matches."""
    got = torch.zeros(PROOF_BYTES, dtype=torch.uint8, device=group.device)
    try:
        wait_work(group, _live(group).recv([got], group.peer, tag_for(nonce)), time.monotonic() + timeout, "join proof")
    except TransferError as exc:
        raise JoinRejected(f"the peer sent no join proof ({exc})") from None
    if not hmac.compare_digest(bytes(got.cpu().tolist()), secret):
        raise JoinRejected("the peer's join proof does not match this session's secret")


def send_transfer(group: Group, seq: int, tensors: Sequence[torch.Tensor], timeout: float | None = None) -> int:
    """Send the header and then each tensor of transfer ``seq``; returns the bytes sent."""
    pg = _live(group)
    deadline = time.monotonic() + (group.timeout if timeout is None else timeout)
    payload = [flat_bytes(t) for t in tensors if t.numel()]
    total = sum(int(p.numel()) for p in payload)
    header = torch.tensor([protocol.TRANSFER_MAGIC, seq, len(payload), total], dtype=torch.int64, device=group.device)
    tag = tag_for(seq)
    wait_work(group, pg.send([header], group.peer, tag), deadline, f"send of header {seq}")
    for i, part in enumerate(payload):
        wait_work(group, _live(group).send([part], group.peer, tag), deadline, f"send of tensor {i} of transfer {seq}")
    return total


def recv_transfer(group: Group, metadata: TransferMetadata, timeout: float | None = None) -> dict[str, torch.Tensor]:
    """Receive transfer ``metadata.seq`` into fresh tensors on the group's device, header first."""
    pg = _live(group)
    deadline = time.monotonic() + (group.timeout if timeout is None else timeout)
    seq = metadata.seq
    header = torch.zeros(4, dtype=torch.int64, device=group.device)
    tag = tag_for(seq)
    wait_work(group, pg.recv([header], group.peer, tag), deadline, f"receive of header {seq}")
    got = [int(v) for v in header.tolist()]
    expected = [protocol.TRANSFER_MAGIC, seq, metadata.n_tensors, metadata.total_bytes]
    if got != expected:
        raise TransferDesync(
            f"{group.tier} header [magic, seq, tensors, bytes] = {got}, expected {expected}: "
            "the group is out of step with the HTTP answer"
        )
    out: dict[str, torch.Tensor] = {}
    for key, dtype, shape in metadata.specs:
        tensor = torch.empty(shape, dtype=dtype, device=group.device)
        if tensor.numel():
            wait_work(group, _live(group).recv([flat_bytes(tensor)], group.peer, tag), deadline, f"receive of {key}")
        out[key] = tensor
    return out


@dataclass(frozen=True)
class TransferMetadata:
    """What one transfer holds: its sequence number and each tensor's key, dtype and shape, in order."""

    seq: int
    tier: str
    specs: tuple[tuple[str, torch.dtype, tuple[int, ...]], ...]

    @classmethod
    def describe(cls, seq: int, tier: str, tensors: Mapping[str, torch.Tensor]) -> TransferMetadata:
        return cls(seq, tier, tuple((k, t.dtype, tuple(t.shape)) for k, t in tensors.items()))

    @property
    def n_tensors(self) -> int:
        """Messages after the header: empty tensors are not sent."""
        return sum(1 for _, _, shape in self.specs if _numel(shape))

    @property
    def total_bytes(self) -> int:
        return sum(_numel(shape) * _itemsize(dtype) for _, dtype, shape in self.specs)

    def to_json(self) -> dict[str, Any]:
        """Upstream's NCCL metadata layout plus ``seq``, ``tier`` and ``total_bytes``."""
        return {
            "seq": self.seq,
            "tier": self.tier,
            "keys_order": [k for k, _, _ in self.specs],
            "metadata": {k: {"dtype_code": wire.DTYPE_TO_CODE[d], "shape": list(s)} for k, d, s in self.specs},
            "total_bytes": self.total_bytes,
        }

    @classmethod
    def from_json(cls, body: Any) -> TransferMetadata:
        """Parse and check a metadata body; raises ValueError saying what is wrong."""
        if not isinstance(body, dict):
            raise ValueError(f"transfer metadata must be a JSON object, got {type(body).__name__}")
        try:
            seq, tier, keys, meta = int(body["seq"]), str(body["tier"]), list(body["keys_order"]), body["metadata"]
            specs = []
            for key in keys:
                entry = meta[key]
                dtype = wire.CODE_TO_DTYPE[int(entry["dtype_code"])]
                shape = tuple(int(d) for d in entry["shape"])
                if any(d < 0 for d in shape):
                    raise ValueError(f"negative dimension in {key}: {shape}")
                specs.append((str(key), dtype, shape))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"malformed transfer metadata ({type(exc).__name__}: {exc})") from None
        parsed = cls(seq, tier, tuple(specs))
        if "total_bytes" in body and int(body["total_bytes"]) != parsed.total_bytes:
            raise ValueError(f"total_bytes {body['total_bytes']} does not match the shapes ({parsed.total_bytes})")
        return parsed


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()
