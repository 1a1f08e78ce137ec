"""A ``/generate`` job and the requests that wait for it.

A job is one admitted ``/generate``: its inputs, mapping, encoding and transfer, and the
requests (:class:`Waiter`) awaiting its answer: the first one, then retries of the same
request id that attached to it instead of queueing a second forward (:func:`request_key`).
A queued job is either claimed by the model thread or dropped because nobody waits for it
any more, never both (its ``state``, changed under the pipeline's lock). A job with a request
id whose attempts all left is still computed at its turn within ``--retry-grace`` of the last
one leaving, since its retry (same id) is on its way; :class:`KeptAnswers` holds an answer its
client did not receive for that retry, within the resend store's memory budget.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from sanic import Request

from eagle3_appliance.core.admission import Ticket
from eagle3_appliance.core.inputs import GenerateInputs, VocabMapping
from eagle3_appliance.core.sessions import Session
from eagle3_appliance.dataplanes.resend_store import ResendStore, StoredResult
from eagle3_appliance.dataplanes.streaming import AnswerStream
from eagle3_appliance.dataplanes.transfer import Transfer, WireTransfer
from eagle3_appliance.errors import MalformedBody
from eagle3_client import protocol
from eagle3_client.capture import EAGLE3, Capture
from eagle3_client.encodings import Encoding

__all__ = [
    "ABANDONED",
    "KEEP_ANSWER_S",
    "QUEUED",
    "RUNNING",
    "Computation",
    "Job",
    "KeptAnswers",
    "RequestKey",
    "Waiter",
    "request_key",
]

RequestKey = tuple[str, str, bytes]  # session id, request id, digest of the body

_REQUEST_ID = re.compile(rf"[A-Za-z0-9._-]{{1,{protocol.REQUEST_ID_MAX_LEN}}}")

# An answer that finished while its client was between attempts (or whose send broke) is kept
# this long for a retry of the same request id (its memory counted in --resend-budget-mb).
KEEP_ANSWER_S = 10.0

# Job states (changed under Pipeline._lock): a queued job is either claimed by the model
# thread (running) or dropped because nobody waits for it any more (abandoned), never both.
QUEUED, RUNNING, ABANDONED = "queued", "running", "abandoned"


def _always() -> bool:
    return True


def request_key(request: Request, session: Session, transfer: Transfer) -> tuple[str, str, bytes] | None:
    """What a retry must match to share a computation: session, request id and body digest.

    Only wire answers are shared (a group transfer is bound to its own sequence number and is
    never blindly retried by our client); no header, no sharing, as for every upstream client.
    """
    request_id = request.headers.get(protocol.REQUEST_ID_HEADER)
    if request_id is None:
        return None
    if not _REQUEST_ID.fullmatch(request_id):
        raise MalformedBody(
            f"{protocol.REQUEST_ID_HEADER} must be 1 to {protocol.REQUEST_ID_MAX_LEN} letters, digits, "
            f"'.', '_' or '-', got {request_id[:40]!r}"
        )
    if not isinstance(transfer, WireTransfer):
        return None
    return session.id, request_id, hashlib.blake2b(request.body, digest_size=16).digest()


@dataclass
class Waiter:
    """A request awaiting a job's answer: its ticket, its client's presence, whether it still awaits."""

    ticket: Ticket
    connected: Callable[[], bool]
    active: bool = True  # False once its handler stopped waiting (gone, timed out)

    def wants(self) -> bool:
        return self.active and self.connected()


@dataclass
class Job:
    """One admitted ``/generate``: what to compute and how it will leave.

    ``connected`` tells (from any thread) whether the client is still connected; ``key`` is set
    for a job that retries of the same request may attach to (:func:`request_key`); ``waiters``
    are the requests awaiting the answer (this one, then attached retries).
    """

    inputs: GenerateInputs
    mapping: VocabMapping | None  # None only for a capture that needs none (DFlash)
    encoding: Encoding
    transfer: Transfer
    ticket: Ticket
    connected: Callable[[], bool] = _always
    key: tuple[str, str, bytes] | None = None
    session_id: str | None = None  # whose clients' patience applies (eagle3_appliance.serving.scheduling)
    waiters: list[Waiter] = field(default_factory=list)
    state: str = QUEUED
    capture: Capture = EAGLE3  # which layers and supervision (eagle3_client.capture)
    left_at: float | None = None  # time.monotonic() when its last waiter stopped waiting
    # Set when the answer may leave while it is computed (a job computed alone: dataplanes/streaming.py).
    stream: AnswerStream | None = None

    def retry_expected(self, grace: float, now: float) -> bool:
        """Nobody waits, but a retry of the same request id may come: the last attempt left within ``grace``.

        A waiter still active but disconnected (its handler not yet cancelled) has just left too.
        """
        return self.key is not None and grace > 0 and (self.left_at is None or now - self.left_at <= grace)

    def wanted(self) -> bool:
        """Someone still awaits the answer and is connected."""
        return any(w.wants() for w in self.waiters)

    def awaited(self) -> bool:
        return any(w.active for w in self.waiters)

    def accepts(self, other: Job) -> bool:
        """``other`` may wait for this job's answer instead of computing its own."""
        return (
            self.state != ABANDONED
            and self.mapping is other.mapping
            and self.encoding == other.encoding
            and self.capture == other.capture
        )


@dataclass
class Computation:
    """A job's computation on the event loop: the job and the task that computes it."""

    job: Job
    task: asyncio.Future[dict[str, torch.Tensor] | None]


class KeptAnswers:
    """Answers their client did not receive, kept :data:`KEEP_ANSWER_S` for a retry of the same request id.

    Their bytes count in ``store`` (the resend store's ``--resend-budget-mb``, shared with the
    answers kept for resends), which drops the oldest first: a dropped answer costs its retry a
    forward, never a wrong answer. Used on the event loop only.
    """

    def __init__(self, store: ResendStore) -> None:
        self._store = store
        self._kept: dict[RequestKey, tuple[float, Job, StoredResult]] = {}

    def keep(self, job: Job, answer: dict[str, torch.Tensor]) -> None:
        if job.key is None:
            return
        self._expire(time.monotonic())
        self._forget(job.key)
        result = StoredResult(0, answer, nbytes=sum(t.numel() * t.element_size() for t in answer.values()))
        self._store.keep(result)
        if result.dropped is None:
            self._kept[job.key] = (time.monotonic() + KEEP_ANSWER_S, job, result)

    def take(self, job: Job) -> dict[str, torch.Tensor] | None:
        """The kept answer ``job`` (a retry) may have, once; None when there is none (or it expired, or was dropped)."""
        if job.key is None:
            return None
        entry = self._kept.pop(job.key, None)
        if entry is None:
            return None
        deadline, kept_job, result = entry
        answer, dropped = result.tensors, result.dropped
        result.close()
        if dropped is not None or deadline < time.monotonic() or not kept_job.accepts(job):
            return None
        return answer

    def __len__(self) -> int:
        return len(self._kept)

    def _forget(self, key: RequestKey) -> None:
        entry = self._kept.pop(key, None)
        if entry is not None:
            entry[2].close()

    def _expire(self, now: float) -> None:
        for key in [k for k, v in self._kept.items() if v[0] <= now or v[2].dropped is not None]:
            self._forget(key)
