"""The process-group data plane (NCCL or gloo) of one server, with the wire as its safety net.

Life of the plane::

    wire --(POST /data_plane, rendezvous, hello)--> group --(broken transfer)--> wire
      ^                                                                           |
      +------------------------- after the back-off ------------------------------+

A ``/generate`` on the group names its transfer with a sequence number (``X-Eagle3-Transfer``).
The server answers with the transfer's metadata and sends the tensors on the group; this
end checks the header on the group against the metadata before it trusts a byte. If anything
goes wrong (timeout, peer gone, mismatch, dropped HTTP connection) both ends drop the group,
the same answer is fetched over the wire from the server's stored copy (no recompute, nothing
lost) and the group is tried again after a back-off that doubles per consecutive failure. A
blind retry of a group ``/generate`` is never made: it could pair the wrong sends and receives.

Pipelining (several requests of one process in flight on the server): the server sends on the
group in the order it answers the ``/generate`` requests, and NCCL pairs a send with whatever
receive comes next (gloo's tags would catch a mismatch, but only as a broken transfer). So a
request goes through two stages, each one request at a time and in the same order:

1. POST ``/generate`` and read the metadata (the server's forward runs here);
2. receive the tensors on the group, in the order the metadata arrived.

Request *k+1* is sent only once *k*'s metadata is in, so the server has queued *k*'s send
before it even sees *k+1*: the order of the sends is the order of the receives, and *k+1*'s
forward runs while *k*'s tensors travel. Requests on the wire skip both stages (each answer
has its own HTTP exchange). Every change of the group (upgrade, fallback) happens in stage 1's
lock, and a fallback drops only the group it saw fail, never a newer one.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import httpx
import orjson
import torch

from eagle3_client import protocol
from eagle3_client.errors import (
    ProtocolViolation,
    RemoteTargetError,
    TargetHTTPError,
    TargetTimeout,
    TargetUnreachable,
    first_line,
)
from eagle3_client.transports.control import ControlPlane
from eagle3_client.transports.dataplane import (
    Answer,
    DataPlane,
    TransferStats,
    WireDataPlane,
    check_supervision,
    mapping_version,
)
from eagle3_client.transports.negotiate import DataPlaneConfig
from eagle3_client.transports.socketbody import RECV_INTO
from eagle3_client.transports.transfer import (
    PROOF_BYTES,
    Group,
    RendezvousStore,
    TransferError,
    TransferMetadata,
    TransferTimeout,
    connect_store,
    open_group,
    recv_transfer,
    send_proof,
)

__all__ = ["GroupDataPlane"]

logger = logging.getLogger(__name__)

_JOIN_POLL_S = 0.5  # while a join takes longer than this, ask the server how its end is doing
# States of the server's end in which it will never complete the rendezvous.
_SERVER_GAVE_UP = frozenset({"failed", "rejected", "closed", "shutdown", "replaced", "peer gone", "none"})


@dataclass(frozen=True)
class _Requested:
    """What a transfer's ``/generate`` gave: a :class:`WireAnswer` (kind ``"wire"``), the
    :class:`TransferMetadata` (kind: the group tier) or the error (kind ``"broken"``), with the
    group it was asked for on and the vocab-mapping version the answer was computed under."""

    group: Group | None
    value: Any
    mapping_version: int | None = None


class GroupDataPlane(DataPlane):
    """``/generate`` answers over a private NCCL or gloo group, falling back to the wire.

    ``tier`` is the negotiated group tier; ``device`` is where NCCL receives (the trainer's
    CUDA device). Thread-safe: concurrent requests are pipelined in two ordered stages (see
    the module docstring).
    """

    name = "group"

    def __init__(
        self,
        control: ControlPlane,
        *,
        tier: str,
        config: DataPlaneConfig,
        device: torch.device,
        stats: TransferStats | None = None,
    ) -> None:
        super().__init__(control, stats)
        if tier not in (protocol.TIER_NCCL, protocol.TIER_GLOO):
            raise ValueError(f"GroupDataPlane needs tier nccl or gloo, got {tier!r}")
        self.wire = WireDataPlane(control, self.stats)
        self.group_tier = tier
        self.config = config
        self.device = device
        self.host = httpx.URL(control.url).host
        self.group: Group | None = None
        self.port: int | None = None
        self.failed_upgrades = 0
        # Sequence numbers start at a random point so that a transfer of an earlier
        # incarnation of this client can never be mistaken for one of ours.
        self._seq = secrets.randbelow(2**40)
        self._retry_at = 0.0  # monotonic time of the next upgrade attempt
        self._failures = 0  # consecutive; sets the back-off
        self._fell_back = False  # a later successful upgrade is a re-upgrade
        self._post_lock = threading.RLock()  # stage 1, and every change of the group
        self._turns = threading.Condition()  # stage 2: receives in the order of stage 1
        self._next_turn = 0
        self._serving = 0

    @property
    def tier(self) -> str:
        return self.group_tier if self.group is not None else protocol.TIER_WIRE

    def fetch(self, payload: bytes, *, retries: bool = True, headers: Mapping[str, str] | None = None) -> Answer:
        with self._post_lock:
            if self.group is None and time.monotonic() >= self._retry_at:
                self._upgrade()
            on_group = self.group is not None
            if on_group:
                seq, kind, answer = self.request_transfer(payload, retries=retries, headers=headers)
                turn = self._next_turn
                self._next_turn += 1
        if not on_group:
            return self.wire.fetch(payload, retries=retries, headers=headers)
        with self._turn(turn):
            return self._receive(seq, kind, answer, payload, retries)

    @contextlib.contextmanager
    def _turn(self, turn: int) -> Iterator[None]:
        with self._turns:
            while self._serving != turn:
                self._turns.wait()
        try:
            yield
        finally:
            with self._turns:
                self._serving += 1
                self._turns.notify_all()

    def close(self) -> None:
        """Drop this end; the server drops its end when the session ends (``/disconnect``)."""
        self._drop_group(tell_server=False)

    # -- upgrade --------------------------------------------------------------------------

    def _upgrade(self) -> None:
        """Ask for a group, join it, prove we own the session, check the hello. On failure stay on
        the wire until the back-off ends."""
        timeout = self.config.connect_timeout
        try:
            # Not retried: a failed upgrade costs nothing, the back-off brings the next try.
            request = protocol.DataPlaneRequest(self.group_tier, proof=True)
            body = self.control.post_json(protocol.EP_DATA_PLANE, request.to_json(), retries=False)
            reply = protocol.DataPlaneReply.from_json(body)
            if reply.tier != self.group_tier or reply.port is None or reply.key is None or reply.nonce is None:
                raise ProtocolViolation(f"{self.control.url}: asked for {self.group_tier}, got {body}")
            # An older server sends no secret and needs no proof.
            secret = bytes.fromhex(reply.secret) if reply.secret is not None else None
            if secret is not None and len(secret) != PROOF_BYTES:
                raise ProtocolViolation(f"{self.control.url}: a join secret of {len(secret)} bytes")
            port, nonce, key = reply.port, reply.nonce, reply.key
            group = self._join(lambda store: self._join_group(store, port, key, nonce, secret, timeout), timeout)
        except TargetHTTPError as exc:
            if exc.status == 410:
                raise  # the session is gone: the caller registers again
            self._upgrade_failed(exc)
            return
        except (RemoteTargetError, RuntimeError, ValueError, KeyError, TypeError) as exc:
            self._upgrade_failed(exc)
            return
        self.group, self.port = group, port
        if self._fell_back:
            self.stats.reupgrades += 1
            self._fell_back = False
        logger.info("%s: data plane %s up (rendezvous port %d)", self.control.url, self.group_tier, port)

    def _join_group(
        self, store: RendezvousStore, port: int, key: str, nonce: int, secret: bytes | None, timeout: float
    ) -> Group:
        """Rank 1's side of the rendezvous (on the join thread): store, group, proof, hello."""
        store.attach(connect_store(self.host, port, timeout))
        group = open_group(self.group_tier, store, 1, timeout, self.device, key_prefix=f"{key}/")
        try:
            if secret is not None:
                send_proof(group, nonce, secret, timeout)
            recv_transfer(group, TransferMetadata(nonce, self.group_tier, ()), timeout)
        except BaseException:
            group.close()
            raise
        store.detach()  # nothing more to read from the server's store
        return group

    def _join(self, join: Callable[[RendezvousStore], Group], timeout: float) -> Group:
        """Run ``join`` on its own thread; give it up as soon as the server's end has given up.

        Why a thread: a rendezvous that a stranger got into (or that failed on the server)
        would otherwise hold this rank for the whole connect timeout. While the join runs,
        the server's state of this session's group is read every ``_JOIN_POLL_S``; once the
        server has closed its end the join is abandoned (its store detached, so any store wait
        ends at once; a group it still forms later is closed) and the client goes on over the wire.
        """
        store = RendezvousStore(None, timeout)
        attempt = _JoinAttempt(lambda: join(store), store)
        deadline = time.monotonic() + timeout
        while True:
            try:
                return attempt.result(min(_JOIN_POLL_S, max(0.0, deadline - time.monotonic())))
            except concurrent.futures.TimeoutError:
                pass
            state = self._server_link_state()
            if state in _SERVER_GAVE_UP:
                attempt.abandon()
                raise TransferError(f"the server closed its end of the rendezvous ({state})")
            if time.monotonic() >= deadline:
                attempt.abandon()
                raise TransferTimeout(f"{self.group_tier} rendezvous: not up within {timeout:g} s")

    def _server_link_state(self) -> str | None:
        """The server's state of this session's group (``GET /data_plane``), or None if unknown."""
        try:
            body = self.control.request(
                "GET", protocol.EP_DATA_PLANE, self.control.read_json, retries=False, timeout=_JOIN_POLL_S * 4
            )
            session = body.get("session")
        except (RemoteTargetError, AttributeError) as exc:
            logger.debug("%s: could not read the data-plane state: %s", self.control.url, exc)
            return None
        if not isinstance(session, dict):
            return None
        state = session.get("state")
        return state if isinstance(state, str) else None

    def _upgrade_failed(self, exc: BaseException) -> None:
        self.failed_upgrades += 1
        self._tell_server_wire()
        delay = self._schedule_retry()
        logger.warning(
            "%s: could not bring up the %s data plane (%s); using the wire, next try in %.0f s",
            self.control.url,
            self.group_tier,
            first_line(exc, limit=300),
            delay,
        )

    # -- one request on the group -----------------------------------------------------------

    def request_transfer(
        self, payload: bytes, *, retries: bool = True, headers: Mapping[str, str] | None = None
    ) -> tuple[int, str, Any]:
        """POST ``/generate`` for a new transfer: ``(seq, kind, answer)``, where ``kind`` is
        ``"wire"`` (the answer is a :class:`WireAnswer`), the group tier (the answer holds the
        :class:`TransferMetadata`) or ``"broken"`` (the answer is the error)."""
        group = self.group
        self._seq += 1
        seq = self._seq
        try:
            kind, value, version = self.control.request(
                "POST",
                protocol.EP_GENERATE,
                functools.partial(self._read_answer, seq),
                content=payload,
                headers={**(headers or {}), protocol.TRANSFER_HEADER: str(seq)},
                retries=retries,
                retry_lost=False,  # 503s are retried; a lost connection is recovered, never resent
                # The socket transport: a wire answer is received into its tensors, and
                # ControlPlane.abort() can cut the wait for a frozen server short.
                extensions={RECV_INTO: True},
            )
        except TargetHTTPError:
            raise  # an error answer: no transfer was started, the group is intact
        except (TargetUnreachable, ProtocolViolation) as exc:
            if isinstance(exc, TargetTimeout) and isinstance(exc.__cause__, httpx.ReadTimeout):
                # No answer yet: the server is still queueing or computing it and has sent nothing on
                # the group. Raised as it is (eagle3_client.remote.fleet): sent again over the wire it
                # would be computed a second time (a group transfer cannot be joined by request id).
                raise
            # The server may or may not have started transfer ``seq``.
            return seq, "broken", _Requested(group, exc)
        return seq, kind, _Requested(group, value, version)

    def receive(self, seq: int, kind: str, answer: Any, payload: bytes) -> dict[str, torch.Tensor]:
        """Finish a transfer started by :meth:`request_transfer`, recovering over the wire if it broke."""
        return self._receive(seq, kind, answer, payload, True).tensors

    def _receive(self, seq: int, kind: str, answer: _Requested, payload: bytes, retries: bool) -> Answer:
        group = answer.group
        if kind == "broken":
            self._fall_back(answer.value, group)
            return self._resend(seq, payload, retries)
        if kind == protocol.TIER_WIRE:
            # No echo: the server no longer has our group and answered in the body.
            self._fall_back("the server answered without the group (it dropped its end)", group)
            return self.wire.accept(answer.value)
        if group is None or group.closed or group is not self.group:
            # Dropped after this transfer was asked for (by a broken transfer before it, which
            # counted the fallback, or with the plane); the server still holds the answer.
            self._fall_back("the group was closed before the transfer", group)
            return self._resend(seq, payload, retries)
        start = time.perf_counter()
        try:
            tensors = recv_transfer(group, answer.value, self.config.timeout)
            result = check_supervision(self.control.url, tensors)  # type: ignore[arg-type]
        except (TransferError, ProtocolViolation, RuntimeError) as exc:
            self._fall_back(exc, group)
            return self._resend(seq, payload, retries)
        nbytes = sum(t.numel() * t.element_size() for t in result.values())
        self.stats.record(self.group_tier, nbytes, time.perf_counter() - start)
        self._failures = 0
        return Answer(result, answer.mapping_version)

    def _read_answer(self, seq: int, resp: httpx.Response) -> tuple[str, Any, int | None]:
        echo = resp.headers.get(protocol.TRANSFER_HEADER)
        if echo is None:
            wire_answer = self.wire.read_timed(resp)
            return protocol.TIER_WIRE, wire_answer, wire_answer.mapping_version
        if echo.strip() != str(seq):
            raise ProtocolViolation(f"{resp.request.url}: asked for transfer {seq}, the answer is for {echo!r}")
        version = mapping_version(self.control.url, resp.headers)
        body = resp.read()
        try:
            metadata = TransferMetadata.from_json(orjson.loads(body))
        except (orjson.JSONDecodeError, ValueError) as exc:
            raise ProtocolViolation(f"{resp.request.url}: bad transfer metadata: {exc}") from None
        if metadata.seq != seq or metadata.tier != self.group_tier:
            raise ProtocolViolation(
                f"{resp.request.url}: metadata is for transfer {metadata.seq} on {metadata.tier}, "
                f"expected {seq} on {self.group_tier}"
            )
        return self.group_tier, metadata, version

    # -- recovery -------------------------------------------------------------------------

    def _fall_back(self, reason: object, group: Group | None) -> None:
        """Drop ``group`` (both ends) and wait out the back-off; nothing if a newer group replaced it."""
        with self._post_lock:
            if group is not self.group:
                return  # dropped already (by the transfer that broke it, or with the plane)
            self.stats.fallbacks += 1
            self._fell_back = True
            self._drop_group(tell_server=True)
            delay = self._schedule_retry()
        logger.warning(
            "%s: %s transfer broke (%s); answering over the wire, retrying the group in %.0f s",
            self.control.url,
            self.group_tier,
            first_line(reason, limit=300),
            delay,
        )

    def _resend(self, seq: int, payload: bytes, retries: bool = True) -> Answer:
        """The server's stored answer to transfer ``seq`` over the wire; recompute only if it has none."""
        try:
            answer = self.control.request(
                "POST",
                protocol.EP_DATA_PLANE_RESEND,
                self.wire.read_timed,
                content=orjson.dumps(protocol.ResendRequest(seq).to_json()),
                content_type=protocol.JSON,
                retries=retries,
                extensions={RECV_INTO: True},
            )
        except TargetHTTPError as exc:
            if exc.status != protocol.RESEND_CONFLICT_STATUS:
                raise
            return self.wire.fetch(payload, retries=retries)  # the server no longer holds it (or never did)
        return self.wire.accept(answer)

    def _schedule_retry(self) -> float:
        self._failures += 1
        delay = min(self.config.backoff * 2.0 ** (self._failures - 1), self.config.max_backoff)
        self._retry_at = time.monotonic() + delay
        return delay

    def _drop_group(self, *, tell_server: bool) -> None:
        group, self.group, self.port = self.group, None, None
        if group is not None:
            group.close()
        if tell_server:
            self._tell_server_wire()

    def _tell_server_wire(self) -> None:
        """Best effort: the server drops its end too (its pending send then fails at once)."""
        try:
            self.control.post_json(
                protocol.EP_DATA_PLANE, protocol.DataPlaneRequest(protocol.TIER_WIRE).to_json(), retries=False
            )
        except RemoteTargetError as exc:
            logger.debug("%s: could not tell the server to drop the group: %s", self.control.url, exc)


class _JoinAttempt:
    """One rendezvous on a daemon thread; abandoning it closes whatever it still builds."""

    def __init__(self, join: Callable[[], Group], store: RendezvousStore) -> None:
        self._future: concurrent.futures.Future[Group] = concurrent.futures.Future()
        self._store = store
        self._abandoned = False
        self._lock = threading.Lock()
        threading.Thread(target=self._run, args=(join,), name="eagle3-data-plane-join", daemon=True).start()

    def _run(self, join: Callable[[], Group]) -> None:
        try:
            group = join()
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
            self._future.set_exception(exc)
            return
        with self._lock:
            if self._abandoned:
                group.close()
                self._future.set_exception(TransferError("the rendezvous was abandoned"))
                return
            self._future.set_result(group)

    def result(self, timeout: float) -> Group:
        return self._future.result(timeout)

    def abandon(self) -> None:
        with self._lock:
            self._abandoned = True
            done = self._future.done() and self._future.exception() is None
        self._store.detach()
        if done:
            self._future.result().close()
