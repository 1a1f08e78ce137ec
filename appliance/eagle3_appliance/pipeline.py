"""``/generate`` from request to answer, one step after the other, each in its own module.

::

    decode and validate  (validation)      body -> GenerateInputs, against the server's limits
    choose the transfer  (choose_transfer) wire, our group, or upstream's NCCL: decided here only
    admit                (admission)       bounded queue, 503 + Retry-After beyond it
    forward              (target)          the model, aux-layer captures, the LM head's input if needed
    supervise            (supervision)     the answer in the session's encoding, into reused memory
    prepare              (transfer)        host copies, or device tensors ready for a group send
    send                 (transfer)        HTTP body, or metadata + group sends

Which waiting request goes next is :mod:`eagle3_appliance.scheduling`'s choice (the oldest,
unless its client will have given up by the answer). Forward, supervise and prepare run on
:class:`ModelRunner`, the one thread that touches the model (the aux-layer hooks write into one
capture slot, so forwards must not overlap, and a single worker thread gives that ordering
without a lock the event loop would block on). With
micro-batching on, jobs of one sequence length go through :class:`MicroBatcher`, which runs
them as one stacked forward on the same thread and through the same steps; either way the
request time limit, the queue accounting and the metrics are the same.

Nobody waits, nothing is computed: a job whose clients have all gone (their handler was
cancelled, or their socket shows a hang-up right before the forward) is dropped and counted
in ``eagle3_generate_abandoned_total``. A retry of a wire ``/generate`` that names the same
request id (``X-Eagle3-Request-Id``, same session, same body) while the first is still queued
or computing becomes one more waiter of that job instead of a second forward; an answer that
finished (or whose send broke) while its client was between attempts is kept for
:data:`KEEP_ANSWER_S` for that retry.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from sanic import Request

from eagle3_appliance import supervision
from eagle3_appliance.admission import Admission, Ticket
from eagle3_appliance.buffers import ServerBuffers
from eagle3_appliance.connections import client_connected
from eagle3_appliance.errors import MalformedBody, NotConfigured, Unavailable
from eagle3_appliance.group_plane import LINK_KEY, GroupTransfer
from eagle3_appliance.inputs import GenerateInputs, VocabMapping
from eagle3_appliance.limits import ServingLimits, TargetShape, derive_limits
from eagle3_appliance.metrics import Metrics
from eagle3_appliance.microbatch import MicroBatcher
from eagle3_appliance.scheduling import Scheduler
from eagle3_appliance.sessions import Session
from eagle3_appliance.settings import Settings
from eagle3_appliance.target import ForwardOutputs, Target
from eagle3_appliance.transfer import Transfer, WireTransfer
from eagle3_appliance.upstream_nccl import upstream_transfer
from eagle3_appliance.validation import decode_body, validate_generate
from eagle3_client import protocol
from eagle3_client.encodings import PROBS, Encoding, parse_encoding

__all__ = ["Job", "ModelRunner", "Pipeline", "Waiter", "choose_transfer", "request_key"]

T = TypeVar("T")

_REQUEST_ID = re.compile(rf"[A-Za-z0-9._-]{{1,{protocol.REQUEST_ID_MAX_LEN}}}")

# An answer that finished while its client was between attempts (or whose send broke) is kept
# this long for a retry of the same request id; at most KEEP_ANSWERS of them (memory).
KEEP_ANSWER_S = 10.0
KEEP_ANSWERS = 2

# Job states (changed under Pipeline._lock): a queued job is either claimed by the model
# thread (running) or dropped because nobody waits for it any more (abandoned), never both.
QUEUED, RUNNING, ABANDONED = "queued", "running", "abandoned"


def _always() -> bool:
    return True


class ModelRunner:
    """The one thread that runs model work, in submission order."""

    def __init__(self) -> None:
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def shutdown(self, wait: bool = True) -> None:
        self._executor.shutdown(wait=wait, cancel_futures=not wait)


def choose_transfer(request: Request, session: Session, buffers: ServerBuffers) -> Transfer:
    """How this ``/generate`` answer leaves: the one place that decides.

    Our clients name a group transfer with ``X-Eagle3-Transfer: <seq>`` (a session without a
    working group is answered in the body, without the echo, so the client falls back);
    upstream's clients ask for their NCCL group with ``X-NeMo-NCCL: 1``; anything else is
    a plain wire answer.
    """
    header = request.headers.get(protocol.TRANSFER_HEADER)
    if header is not None and not session.anonymous:
        try:
            seq = int(header)
        except ValueError:
            raise MalformedBody(f"{protocol.TRANSFER_HEADER} must be an integer, got {header!r}") from None
        link = session.extras.get(LINK_KEY)
        return GroupTransfer(session, seq, link if link is not None and not link.closed else None, buffers)
    if request.headers.get(protocol.NCCL_HEADER) == "1":
        upstream = upstream_transfer(session)
        if upstream is not None:
            return upstream
    return WireTransfer(buffers)


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
    mapping: VocabMapping
    encoding: Encoding
    transfer: Transfer
    ticket: Ticket
    connected: Callable[[], bool] = _always
    key: tuple[str, str, bytes] | None = None
    session_id: str | None = None  # whose clients' patience applies (eagle3_appliance.scheduling)
    waiters: list[Waiter] = field(default_factory=list)
    state: str = QUEUED

    def wanted(self) -> bool:
        """Someone still awaits the answer and is connected."""
        return any(w.wants() for w in self.waiters)

    def awaited(self) -> bool:
        return any(w.active for w in self.waiters)

    def accepts(self, other: Job) -> bool:
        """``other`` may wait for this job's answer instead of computing its own."""
        return self.state != ABANDONED and self.mapping is other.mapping and self.encoding == other.encoding


@dataclass
class _Computation:
    """A job's computation on the event loop: the job and the task that computes it."""

    job: Job
    task: asyncio.Future[dict[str, torch.Tensor] | None]


class Pipeline:
    """The ``/generate`` steps, shared by every request of one server (see the module docstring)."""

    def __init__(
        self,
        settings: Settings,
        target: Target,
        buffers: ServerBuffers,
        admission: Admission,
        metrics: Metrics,
        runner: ModelRunner | None = None,
        limits: ServingLimits | None = None,
    ) -> None:
        self.settings = settings
        self.target = target
        self.limits = limits or derive_limits(settings, TargetShape.of(target), device=target.device)
        self.vocab_size = target.vocab_size  # token ids are checked against it before the forward
        self.buffers = buffers
        self.admission = admission
        self.metrics = metrics
        self.runner = runner or ModelRunner()
        self.scheduler = Scheduler(lambda: admission.compute_seconds)
        self.batcher: MicroBatcher[Job, dict[str, torch.Tensor] | None] | None = None
        self._lock = threading.Lock()  # job states and attached waiters (event loop and model thread)
        self._shared: dict[tuple[str, str, bytes], _Computation] = {}
        # Answers their client did not receive, for an immediate retry: key -> (expiry, job, answer).
        self._kept: dict[tuple[str, str, bytes], tuple[float, Job, dict[str, torch.Tensor]]] = {}
        if settings.microbatch_wait_ms > 0:
            self.batcher = MicroBatcher(
                self._run_group,
                wait_s=settings.microbatch_wait_ms / 1000,
                max_tokens=settings.microbatch_max_tokens,
            )

    async def generate(self, request: Request, session: Session) -> None:
        """Answer one ``/generate`` request of ``session``."""
        inputs = validate_generate(
            decode_body(request.body),
            vocab_size=self.vocab_size,
            max_seq_len=self.limits.max_seq_len,
            max_batch_tokens=self.limits.max_batch_tokens,
        )
        mapping = session.mapping
        if mapping is None:
            raise NotConfigured("call /set_vocab_mapping before /generate: the draft vocabulary is not set")
        encoding = parse_encoding(session.encoding)
        transfer = choose_transfer(request, session, self.buffers)
        # Only what our client negotiated is named: upstream's answer stays header-free.
        headers = {} if encoding == PROBS else {protocol.ENCODING_HEADER: encoding.name}
        if mapping.version is not None:  # the mapping this answer is computed under, for the client's decode
            headers[protocol.MAPPING_VERSION_HEADER] = str(mapping.version)
        if request.headers.get(protocol.FAILOVER_HEADER):
            self.metrics.failovers.inc()
        key = request_key(request, session, transfer)
        async with self.admission.admit() as ticket:  # 503 + Retry-After when the queue is full
            job = Job(inputs, mapping, encoding, transfer, ticket, client_connected(request), key, session.id)
            answer = await self.compute(job)
            try:
                tier = await transfer.send(request, answer, ticket, headers)
            except BaseException:
                self._keep(job, answer)  # the client left during the send: its retry gets this answer
                raise
            self.metrics.observe_generate(ticket, sequences=inputs.batch_size, tokens=inputs.tokens)
            self.metrics.record_sent(tier, encoding.name, ticket.nbytes)

    async def compute(self, job: Job) -> dict[str, torch.Tensor]:
        """Forward, supervise and prepare ``job`` on the model thread, within ``--request-timeout``.

        The computation runs as its own task, so that a retry attached to it (same request
        key) keeps it alive when the first client leaves (see :meth:`_orphaned` for what
        happens when no request awaits it any more).
        """
        waiter = Waiter(job.ticket, job.connected)
        computation = self._attach(job, waiter)
        timeout = self.settings.request_timeout
        reason = "client_gone"
        try:
            answer = await asyncio.wait_for(asyncio.shield(computation.task), timeout=timeout)
        except asyncio.TimeoutError:
            reason = "timeout"
            raise Unavailable(
                f"/generate exceeded this server's request time limit of {timeout:g} s "
                "(waiting for the model plus computing); retry later or send smaller batches",
                headers=self.admission.retry_after(),
            ) from None
        finally:
            with self._lock:
                waiter.active = False
                orphaned = not computation.job.awaited()
            if orphaned and not computation.task.done():
                self._orphaned(computation, reason)
        if answer is None:  # dropped on the model thread: every client had gone (this one attached late)
            raise Unavailable(
                "the computation this request was waiting for was dropped; send it again",
                headers=self.admission.retry_after(),
            )
        return answer

    def _attach(self, job: Job, waiter: Waiter) -> _Computation:
        """The computation ``waiter`` awaits: a matching one in flight (a retry), else ``job``'s own."""
        if job.key is not None:
            kept = self._kept_answer(job)
            if kept is not None:
                done: asyncio.Future[dict[str, torch.Tensor] | None] = asyncio.get_running_loop().create_future()
                done.set_result(kept)
                return _Computation(job, done)
            with self._lock:
                running = self._shared.get(job.key)
                if running is not None and running.job.accepts(job):
                    running.job.waiters.append(waiter)
                    return running
        job.waiters.append(waiter)
        if self.batcher is not None:
            work = self.batcher.submit(job, seq_len=job.inputs.seq_len, tokens=job.inputs.tokens)
        else:
            work = self._run_alone(job)
        computation = _Computation(job, asyncio.ensure_future(work))
        computation.task.add_done_callback(_consume)
        if job.key is not None:
            key = job.key
            self._shared[key] = computation

            def forget(task: asyncio.Future[dict[str, torch.Tensor] | None]) -> None:
                if self._shared.get(key) is computation:
                    del self._shared[key]
                if not computation.job.awaited() and not task.cancelled() and task.exception() is None:
                    answer = task.result()
                    if answer is not None:  # finished while its client was between attempts
                        self._keep(computation.job, answer)

            computation.task.add_done_callback(forget)
        return computation

    def _keep(self, job: Job, answer: dict[str, torch.Tensor]) -> None:
        """Hold an answer its client did not get, for :data:`KEEP_ANSWER_S`, for a retry of its request id."""
        if job.key is None:
            return
        now = time.monotonic()
        self._kept = {k: v for k, v in self._kept.items() if v[0] > now}
        self._kept.pop(job.key, None)
        self._kept[job.key] = (now + KEEP_ANSWER_S, job, answer)
        while len(self._kept) > KEEP_ANSWERS:
            del self._kept[next(iter(self._kept))]

    def _kept_answer(self, job: Job) -> dict[str, torch.Tensor] | None:
        assert job.key is not None
        entry = self._kept.pop(job.key, None)
        if entry is None or entry[0] < time.monotonic() or not entry[1].accepts(job):
            return None
        return entry[2]

    def _orphaned(self, computation: _Computation, reason: str) -> None:
        """Nobody awaits ``computation`` any more.

        A job without a request id is dropped now. One with an id keeps its place in the queue,
        so that a retry (which follows at once) attaches to it without queueing again; the model
        thread drops it if nobody has attached by its turn. A job already on the model thread
        runs to its end either way (a retry may still attach to it).
        """
        if computation.job.key is None and self._abandon(computation.job, reason):
            computation.task.cancel()

    def _abandon(self, job: Job, reason: str) -> bool:
        """Drop a job nobody waits for, unless the model thread has already claimed it."""
        with self._lock:
            if job.state != QUEUED:
                return False
            job.state = ABANDONED
        self.metrics.abandoned.labels(reason).inc()
        if reason == "client_gone" and job.key is None and job.session_id is not None:
            # A client without request ids gave up after waiting this long (its retry, if any,
            # queues anew): what the scheduler expects of that session's clients.
            self.scheduler.patience.gave_up(job.session_id, time.perf_counter() - job.ticket.admitted)
        return True

    def _claim(self, job: Job) -> bool:
        """On the model thread, right before the forward: run the job if a client still waits."""
        with self._lock:
            if job.state == QUEUED and not job.wanted():
                job.state = ABANDONED
                self.metrics.abandoned.labels("client_gone").inc()
                return False
            if job.state != QUEUED:
                return False
            job.state = RUNNING
            return True

    async def _run_alone(self, job: Job) -> dict[str, torch.Tensor] | None:
        return (await self._run_group([job]))[0]

    async def _run_group(self, jobs: list[Job]) -> list[dict[str, torch.Tensor] | None]:
        """Wait for this unit's turn (:mod:`eagle3_appliance.scheduling`), then run it on the model thread."""
        async with self.scheduler.turn([job.session_id for job in jobs], min(job.ticket.admitted for job in jobs)):
            return await self.runner.run(self._compute_on_model_thread, jobs)

    @torch.no_grad()
    def _compute_on_model_thread(self, all_jobs: list[Job]) -> list[dict[str, torch.Tensor] | None]:
        """One forward for the jobs someone still waits for (stacked when there are several), then
        each job's answer; None for a job that was dropped instead."""
        jobs = [job for job in all_jobs if self._claim(job)]
        if not jobs:
            return [None] * len(all_jobs)
        with self._lock:
            tickets = [w.ticket for job in jobs for w in job.waiters if w.active]
        for ticket in tickets:
            ticket.begin_compute()
        try:
            target = self.target
            device = target.device
            alloc = self.buffers.device_alloc()
            inputs = [job.inputs.to(device) for job in jobs]
            capture = any(job.encoding.kind == protocol.ENCODING_HIDDEN for job in jobs)
            if len(jobs) == 1:
                stacked = inputs[0]
            else:  # micro-batching: one forward over the rows of every job
                stacked = GenerateInputs(
                    torch.cat([i.input_ids for i in inputs]),
                    torch.cat([i.attention_mask for i in inputs]),
                    torch.cat([i.loss_mask for i in inputs]),
                )
            out = target.forward(stacked.input_ids, stacked.attention_mask, capture_hidden=capture, alloc=alloc)
            self.metrics.exec_count.inc()
            answers = []
            start = 0
            for job, job_inputs in zip(jobs, inputs, strict=True):
                stop = start + job_inputs.batch_size
                rows: ForwardOutputs = out if len(jobs) == 1 else out.rows(start, stop)
                mapping = job.mapping.to(device)
                answers.append(supervision.encode(job.encoding, rows, job_inputs, mapping, alloc=alloc))
                start = stop
            del out
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # so that the forward phase is the GPU's time
            for ticket in tickets:
                ticket.forward_done()
            prepared = {id(job): job.transfer.prepare(answer) for job, answer in zip(jobs, answers, strict=True)}
            return [prepared.get(id(job)) for job in all_jobs]
        finally:
            for ticket in tickets:
                ticket.end_compute()


def _consume(task: asyncio.Future[Any]) -> None:
    """Retrieve the outcome of a computation nobody awaited any more (no "never retrieved" warning)."""
    if not task.cancelled():
        task.exception()
