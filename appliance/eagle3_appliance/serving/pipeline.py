"""``/generate`` from request to answer, one step after the other, each in its own module.

::

    decode and validate  (validation)      body -> GenerateInputs, against the server's limits
    choose the transfer  (choose_transfer) wire, our group, or upstream's NCCL: decided here only
    admit                (admission)       bounded queue, 503 + Retry-After beyond it
    forward              (target)          the model, aux-layer captures, the LM head's input if needed
                                           (plus the session's DFlash layers: model.capture)
    supervise            (supervision)     the answer in the session's encoding, into reused memory
                                           (a DFlash session's: its layers and logits, model.capture)
    prepare              (transfer)        host copies, or device tensors ready for a group send
    send                 (transfer)        HTTP body, or metadata + group sends
                                           (a streamed-answer session's CPU probs answer leaves
                                           while it is computed: dataplanes/streaming.py)

Which waiting request goes next is :mod:`eagle3_appliance.serving.scheduling`'s choice (the oldest,
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
or computing becomes one more waiter of that job instead of a second forward. Such a job
whose attempts all left keeps its place, and is computed at its turn if the last attempt left
less than ``--retry-grace`` ago (its retry is on its way); an answer that finished (or whose
send broke) while its client was between attempts is kept for that retry, in the resend
store's memory budget (:mod:`eagle3_appliance.serving.jobs`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from sanic import Request

from eagle3_appliance.core.admission import Admission
from eagle3_appliance.core.inputs import GenerateInputs, VocabMapping
from eagle3_appliance.core.sessions import Session
from eagle3_appliance.dataplanes.buffers import ServerBuffers
from eagle3_appliance.dataplanes.group_plane import LINK_KEY, GroupTransfer
from eagle3_appliance.dataplanes.resend_store import ResendStore
from eagle3_appliance.dataplanes.streaming import AnswerStream, send_streamed, streamed_layout
from eagle3_appliance.dataplanes.transfer import SEND_SLICE_BYTES, Transfer, WireTransfer
from eagle3_appliance.dataplanes.upstream_nccl import upstream_transfer
from eagle3_appliance.errors import InvalidRequest, InvalidTensors, MalformedBody, NotConfigured, Unavailable
from eagle3_appliance.model import capture as captures
from eagle3_appliance.model import supervision, vlm
from eagle3_appliance.model.limits import ServingLimits, TargetShape, derive_limits
from eagle3_appliance.model.outputs import ForwardOutputs
from eagle3_appliance.model.target import Target
from eagle3_appliance.model.vlm import VisionRules
from eagle3_appliance.ops.metrics import Metrics
from eagle3_appliance.serving.connections import client_connected
from eagle3_appliance.serving.jobs import (
    ABANDONED,
    QUEUED,
    RUNNING,
    Computation,
    Job,
    KeptAnswers,
    RequestKey,
    Waiter,
    request_key,
)
from eagle3_appliance.serving.microbatch import MicroBatcher
from eagle3_appliance.serving.scheduling import Scheduler
from eagle3_appliance.serving.stream_answers import KeepTransfer, estimate_bytes, kept_tensors, stream_ref
from eagle3_appliance.serving.validation import decode_body, validate_generate
from eagle3_appliance.settings import Settings
from eagle3_appliance.stream.resident import AnswerMismatch, KeptAnswer, ResidentAnswers
from eagle3_client import protocol
from eagle3_client.encodings import PROBS, Encoding, parse_encoding

__all__ = ["ModelRunner", "Pipeline", "choose_transfer"]

T = TypeVar("T")


class ModelRunner:
    """The one thread that runs model work, in submission order."""

    def __init__(self) -> None:
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def intra_op_threads(self) -> int:
        """The threads torch's CPU kernels use on this thread, which is what every forward gets."""
        return self._executor.submit(torch.get_num_threads).result()

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
        working = link if link is not None and not link.closed else None
        return GroupTransfer(session, seq, working, buffers, requested=link.tier if link is not None else None)
    if request.headers.get(protocol.NCCL_HEADER) == "1" and session.capture.is_eagle3:  # upstream's keys only
        upstream = upstream_transfer(session)
        if upstream is not None:
            return upstream
    return WireTransfer(buffers)


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
        kept: ResendStore | None = None,
    ) -> None:
        """``kept``: the memory budget kept answers count in (the data planes' resend store; else one of
        ``--resend-budget-mb`` of its own)."""
        self.settings = settings
        self.target = target
        self.shape = TargetShape.of(target)
        self.limits = limits or derive_limits(settings, self.shape, device=target.device)
        self.vocab_size = target.vocab_size  # token ids are checked against it before the forward
        self.max_packed_rows = target.max_packed_rows  # 1 under FlashAttention (model/packing.py)
        self.buffers = buffers
        self.admission = admission
        self.metrics = metrics
        self.runner = runner or ModelRunner()
        self.scheduler = Scheduler(lambda: admission.compute_seconds)
        self.batcher: MicroBatcher[Job, dict[str, torch.Tensor] | None] | None = None
        self._lock = threading.Lock()  # job states and attached waiters (event loop and model thread)
        self._vision: dict[str, VisionRules | None] = {}  # by capture kind (ViSpec, MSD, DSpark)
        self._shared: dict[RequestKey, Computation] = {}
        # Answers their client did not receive, for an immediate retry.
        self._kept = KeptAnswers(kept if kept is not None else ResendStore(settings.resend_budget_mb << 20))
        # Answers computed ahead for runs' streams (eagle3_appliance.serving.stream_answers).
        high = settings.stream_memory_mb << 20
        reserve = int(high * settings.stream_reserve)
        self.resident = ResidentAnswers(high, int(high * settings.stream_low_watermark), metrics, reserve)
        if settings.microbatch_wait_ms > 0:
            self.batcher = MicroBatcher(
                self._run_group,
                wait_s=settings.microbatch_wait_ms / 1000,
                max_tokens=settings.microbatch_max_tokens,
            )

    def validated(self, request: Request, session: Session) -> tuple[GenerateInputs, VocabMapping | None]:
        """Decode and validate a ``/generate`` body of ``session`` (the decode-and-validate step)."""
        if session.capture.is_eagle3 and self.target.eagle3_refusal is not None:  # an upstream client's
            raise InvalidRequest(f"this server cannot serve the eagle3 capture: {self.target.eagle3_refusal}")
        inputs = validate_generate(
            decode_body(request.body),
            vocab_size=self.vocab_size,
            max_seq_len=self.limits.max_seq_len,
            max_batch_tokens=self.max_tokens(session),
            granted=session.capabilities,
            max_packed_rows=self.max_packed_rows,
            max_mask_bytes=self.limits.max_packed_mask_bytes,
            capture=session.capture,
            vision_rules=self._vision_rules(session),
        )
        capture = session.capture
        captures.check_request(capture, inputs, self.shape, self.limits)
        mapping = session.mapping
        if mapping is None and capture.is_eagle3:
            raise NotConfigured("call /set_vocab_mapping before /generate: the draft vocabulary is not set")
        return inputs, mapping

    def _vision_rules(self, session: Session) -> VisionRules | None:
        """What a ViSpec, MSD or DSpark session's vision tensors may be (None: it takes none); once per kind.

        DSpark takes them only from a vision-language model (its config has an ``image_token_id``),
        checked against the whole model's forward as upstream's wrapper passes them.
        """
        capture = session.capture
        if not capture.takes_vision:
            return None
        if capture.kind not in self._vision:
            vlm_model = capture.is_vlm or vlm.image_token_id(self.target.model) is not None
            limits = self.limits
            rules = (
                VisionRules.of(self.target, capture, limits.max_batch_tokens, limits.working_bytes)
                if vlm_model
                else None
            )
            self._vision[capture.kind] = rules
        return self._vision[capture.kind]

    async def generate(self, request: Request, session: Session) -> None:
        """Answer one ``/generate`` request of ``session`` (a stream claim: the kept answer, no forward)."""
        if protocol.SAMPLE_HEADER in request.headers:
            await self.send_kept(request, session)
            return
        inputs, mapping = self.validated(request, session)
        capture = session.capture
        encoding = parse_encoding(session.encoding)
        transfer = choose_transfer(request, session, self.buffers)
        # Only what our client negotiated is named: upstream's answer stays header-free.
        headers = {} if encoding == PROBS else {protocol.ENCODING_HEADER: encoding.name}
        if mapping is not None and mapping.version is not None:
            # The mapping this answer is computed under, for the client's decode (EAGLE-3 only).
            headers[protocol.MAPPING_VERSION_HEADER] = str(mapping.version)
        if request.headers.get(protocol.FAILOVER_HEADER):
            self.metrics.failovers.inc()
        key = request_key(request, session, transfer)
        async with self.admission.admit() as ticket:  # 503 + Retry-After when the queue is full
            connected = client_connected(request)
            stream = None
            if self._streams(session, transfer, encoding):
                stream = AnswerStream(asyncio.get_running_loop())
            job = Job(inputs, mapping, encoding, transfer, ticket, connected, key, session.id, capture=capture)
            job.stream = stream
            if stream is None:
                answer = await self.compute(job)
                tier = await self._send(request, job, answer, headers)
            else:
                answer, tier = await self._compute_streamed(request, job, stream, headers)
            self.metrics.observe_generate(ticket, sequences=inputs.batch_size, tokens=inputs.tokens)
            self.metrics.record_sent(tier, encoding.name if capture.is_eagle3 else capture.label, ticket.nbytes)
            self.metrics.captures.labels(capture.label).inc()
            if transfer.requested is not None and tier != transfer.requested:
                self.metrics.record_fallback(transfer.requested)

    async def produce(self, request: Request, session: Session) -> protocol.StreamRef:
        """``/stream/produce``: compute one sample's answer and keep it here; its reference.

        The ``/generate`` steps but the last: the answer is kept (:class:`KeepTransfer`), within
        the resident watermarks (reserved before the forward, from the request's shape). A sample
        already kept here is not computed again (a producer that retries, or restarted).
        """
        run_id, sample_id = _sample(request, session)
        if session.capture.is_eagle:
            raise NotConfigured(
                f"streams carry EAGLE-3, DFlash, DSpark, ViSpec and MSD answers, not {session.capture.named}: "
                "ask /generate"
            )
        kept = self.resident.peek(run_id, sample_id)
        if kept is not None:
            _same_stream(kept, session)
            return kept.ref
        inputs, mapping = self.validated(request, session)
        if inputs.vision and not session.capture.takes_vision:  # validated already: refused there too
            raise InvalidTensors(
                f"a {session.capture.label} stream sample carries no vision inputs, got {sorted(inputs.vision)}; "
                "ask /generate"
            )
        capture, encoding = session.capture, parse_encoding(session.encoding)
        estimate = estimate_bytes(self.shape, capture, encoding, mapping, inputs)
        priority = request.headers.get(protocol.PRIORITY_HEADER) == "1"
        reservation = self.resident.reserve(
            run_id, sample_id, estimate, self.admission.retry_after(), priority=priority
        )
        try:
            async with self.admission.admit() as ticket:
                connected = client_connected(request)
                keep = KeepTransfer()
                job = Job(inputs, mapping, encoding, keep, ticket, connected, None, session.id, capture=capture)
                answer = await self.compute(job)
                self.metrics.observe_generate(ticket, sequences=inputs.batch_size, tokens=inputs.tokens)
                self.metrics.captures.labels(capture.label).inc()
        except BaseException:
            self.resident.cancel(reservation)
            raise
        tensors = kept_tensors(answer, inputs, self.target.device)
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        # The address the producer reached this server at is the one trainers use to claim it.
        ref = stream_ref(
            run_id, sample_id, f"appliance://{request.host}", tensors, capture, mapping, self.target.fingerprint
        )
        headers = {} if encoding == PROBS else {protocol.ENCODING_HEADER: encoding.name}
        answer_kept = KeptAnswer(run_id, sample_id, tensors, headers, capture.spec, encoding.name, ref, nbytes)
        return self.resident.keep(reservation, answer_kept).ref

    async def send_kept(self, request: Request, session: Session) -> None:
        """A ``/generate`` with ``X-Eagle3-Sample``: the kept answer, on the session's data plane, no forward."""
        run_id, sample_id = _sample(request, session)
        if request.body:
            raise MalformedBody(
                f"a claim ({protocol.SAMPLE_HEADER} on /generate) has an empty body, got {len(request.body)} bytes"
            )
        kept = self.resident.get(run_id, sample_id, lambda kept: _same_stream(kept, session))
        transfer = choose_transfer(request, session, self.buffers)
        tensors = await asyncio.to_thread(transfer.prepare, kept.tensors)
        tier = await transfer.send(request, tensors, None, kept.headers)
        label = kept.encoding if session.capture.is_eagle3 else session.capture.label
        self.metrics.record_sent(tier, label, kept.nbytes)
        if transfer.requested is not None and tier != transfer.requested:
            self.metrics.record_fallback(transfer.requested)

    def _streams(self, session: Session, transfer: Transfer, encoding: Encoding) -> bool:
        """Whether this answer may leave while it is computed (:mod:`eagle3_appliance.dataplanes.streaming`).

        Only a session that negotiated it, a wire answer in ``probs`` (whose ``target_probs`` is
        filled in body order), and a CPU target (on an accelerator the rows would need a host copy
        and a stream sync per slice; its answer is copied whole, as before).
        """
        return (
            protocol.CAPABILITY_STREAMED_ANSWER in session.capabilities
            and type(transfer) is WireTransfer
            and encoding == PROBS
            and session.capture.is_eagle3
            and self.target.device.type == "cpu"
        )

    async def _send(self, request: Request, job: Job, answer: dict[str, torch.Tensor], headers: dict[str, str]) -> str:
        try:
            return await job.transfer.send(request, answer, job.ticket, headers)
        except BaseException:
            self._kept.keep(job, answer)  # the client left during the send: its retry gets this answer
            raise

    async def _compute_streamed(
        self, request: Request, job: Job, stream: AnswerStream, headers: dict[str, str]
    ) -> tuple[dict[str, torch.Tensor], str]:
        """Compute ``job`` and send its answer as it becomes final; returns the answer and its tier.

        The answer streams only if the model thread starts it (a job computed alone); a kept
        answer, a retry that joins a computation in flight, or a micro-batched job is sent
        whole once complete, as without the capability.
        """
        computing = asyncio.ensure_future(self.compute(job))
        computing.add_done_callback(lambda _: stream.end())
        computing.add_done_callback(_consume)
        try:
            while stream.layout is None and not computing.done():
                await stream.changed()
        except BaseException:
            computing.cancel()
            raise
        if stream.layout is None:
            answer = await computing
            return answer, await self._send(request, job, answer, headers)
        try:
            answer = await send_streamed(request, stream, computing, job.ticket, headers, SEND_SLICE_BYTES)
        except BaseException:
            if computing.done() and not computing.cancelled() and computing.exception() is None:
                self._kept.keep(job, computing.result())  # complete: its retry gets this answer
            else:
                computing.cancel()  # the computation goes on for a retry, as when a client leaves while it waits
            raise
        return answer, protocol.TIER_WIRE

    def max_tokens(self, session: Session) -> int:
        """The most tokens one ``/generate`` of ``session`` may hold: its answer's size per token decides
        (a draft vocabulary below the whole vocabulary leaves room for more tokens)."""
        capture = session.capture
        if not capture.is_eagle3:
            per_token = captures.working_bytes_per_token(self.shape, capture, sliced=self.limits.slice_rows is not None)
            return self.limits.tokens_for(per_token)
        if self.limits.slice_rows is None:
            return self.limits.max_batch_tokens
        mapping = session.mapping
        return self.limits.tokens_for(self.shape.bytes_per_token(None if mapping is None else mapping.draft_vocab_size))

    def _slice_rows(self, inputs: GenerateInputs) -> int | None:
        """Rows per LM-head slice for this forward, or None to run the head over the whole sequence."""
        rows = self.limits.sliced(self.target.device, inputs.tokens, inputs.seq_len)
        if rows is None or self.target.slicing_refusal() is not None:
            return None
        return rows

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
                # Named, so that our client joins the computation instead of failing the server over.
                headers={**self.admission.retry_after(), protocol.TIME_LIMIT_HEADER: f"{timeout:g}"},
            ) from None
        finally:
            with self._lock:
                waiter.active = False
                orphaned = not computation.job.awaited()
                if orphaned:
                    computation.job.left_at = time.monotonic()
            if orphaned and not computation.task.done():
                self._orphaned(computation, reason)
        if answer is None:  # dropped on the model thread: every client had gone (this one attached late)
            raise Unavailable(
                "the computation this request was waiting for was dropped; send it again",
                headers=self.admission.retry_after(),
            )
        return answer

    def _attach(self, job: Job, waiter: Waiter) -> Computation:
        """The computation ``waiter`` awaits: a matching one in flight (a retry), else ``job``'s own."""
        if job.key is not None:
            kept = self._kept.take(job)
            if kept is not None:
                done: asyncio.Future[dict[str, torch.Tensor] | None] = asyncio.get_running_loop().create_future()
                done.set_result(kept)
                return Computation(job, done)
            with self._lock:
                running = self._shared.get(job.key)
                if running is not None and running.job.accepts(job):
                    running.job.waiters.append(waiter)
                    return running
        job.waiters.append(waiter)
        # Packed rows and vision inputs run alone (microbatch.py; a job's vision tensors are its own).
        alone = job.inputs.packing is not None or job.capture.is_vlm or bool(job.inputs.vision)
        if self.batcher is not None and not alone:
            work = self.batcher.submit(job, seq_len=job.inputs.seq_len, tokens=job.inputs.tokens)
        else:
            work = self._run_alone(job)
        computation = Computation(job, asyncio.ensure_future(work))
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
                        self._kept.keep(computation.job, answer)

            computation.task.add_done_callback(forget)
        return computation

    def _orphaned(self, computation: Computation, reason: str) -> None:
        """Nobody awaits ``computation`` any more.

        A job without a request id is dropped now. One with an id keeps its place in the queue,
        so that a retry (which follows at once) attaches to it without queueing again; at its
        turn the model thread still computes it if the last attempt left less than
        ``--retry-grace`` ago (the answer is kept for the retry), and drops it otherwise. A job
        already on the model thread runs to its end either way (a retry may still attach to it).
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
        """On the model thread, right before the forward: run the job if a client still waits, or its retry may."""
        with self._lock:
            if (
                job.state == QUEUED
                and not job.wanted()
                and not job.retry_expected(self.settings.retry_grace, time.monotonic())
            ):
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
        """Wait for this unit's turn (:mod:`eagle3_appliance.serving.scheduling`), then run it on the model thread."""
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
        if len(jobs) == 1 and jobs[0].capture.is_vlm:  # the model's own forward, as upstream's wrapper runs it
            return self._compute_vlm(all_jobs, jobs[0], tickets)
        try:
            target = self.target
            device = target.device
            alloc = self.buffers.device_alloc()
            inputs = [job.inputs.to(device) for job in jobs]
            hidden = any(job.capture.is_eagle3 and job.encoding.kind == protocol.ENCODING_HIDDEN for job in jobs)
            depth = target.num_hidden_layers
            layer_ids = {i for job in jobs for i in captures.hook_points(job.capture, depth)}
            if len(jobs) == 1:
                stacked = inputs[0]
            else:  # micro-batching: one forward over the rows of every job
                stacked = GenerateInputs(
                    torch.cat([i.input_ids for i in inputs]),
                    torch.cat([i.attention_mask for i in inputs]),
                    torch.cat([i.loss_mask for i in inputs]),
                )
            try:
                out, layers = captures.forward_with_layers(
                    target,
                    stacked.input_ids,
                    stacked.attention_mask,
                    layer_ids,
                    capture_hidden=hidden,
                    alloc=alloc,
                    packing=stacked.packing,  # set only for a job alone: packed jobs are never stacked
                    slice_rows=self._slice_rows(stacked),
                    vision=stacked.vision,  # likewise (a DSpark job's vision tensors)
                )
            except Exception as exc:
                if not vlm.request_fault(exc, stacked.vision):
                    raise
                # The model's own check of its vision inputs against the placeholders: the request's fault.
                raise InvalidRequest(f"the model refused this request's vision inputs: {exc!r}") from None
            self.metrics.exec_count.inc()
            answers = []
            start = 0
            for job, job_inputs in zip(jobs, inputs, strict=True):
                stop = start + job_inputs.batch_size
                if not job.capture.is_eagle3:  # DFlash: chosen layers, unshifted, logits if asked; DSpark
                    part = None if len(jobs) == 1 else slice(start, stop)
                    answers.append(captures.encode(job.capture, out, layers, part, alloc=alloc, num_layers=depth))
                    start = stop
                    continue
                rows: ForwardOutputs = out if len(jobs) == 1 else out.rows(start, stop)
                assert job.mapping is not None  # generate() refuses an EAGLE-3 job without one
                mapping = job.mapping.to(device)
                on_rows = None
                if len(jobs) == 1 and job.stream is not None:  # a stacked forward's answers are sent whole
                    on_rows = _publisher(job.stream, rows.aux_hidden_states, job_inputs)
                answers.append(
                    supervision.encode(job.encoding, rows, job_inputs, mapping, alloc=alloc, on_rows=on_rows)
                )
                start = stop
            del out, layers
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # so that the forward phase is the GPU's time
            for ticket in tickets:
                ticket.forward_done()
            prepared = {id(job): job.transfer.prepare(answer) for job, answer in zip(jobs, answers, strict=True)}
            return [prepared.get(id(job)) for job in all_jobs]
        finally:
            for ticket in tickets:
                ticket.end_compute()

    def _compute_vlm(self, all_jobs: list[Job], job: Job, tickets: list[Any]) -> list[dict[str, torch.Tensor] | None]:
        """A ViSpec or MSD job, alone (its vision tensors are its own): :func:`eagle3_appliance.model.vlm.forward`."""
        try:
            device = self.target.device
            answer = vlm.forward(self.target, job.capture, job.inputs.to(device))
            self.metrics.exec_count.inc()
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # so that the forward phase is the GPU's time
            for ticket in tickets:
                ticket.forward_done()
            prepared = job.transfer.prepare(answer)
            return [prepared if other is job else None for other in all_jobs]
        finally:
            for ticket in tickets:
                ticket.end_compute()


def _sample(request: Request, session: Session) -> tuple[str, str]:
    """The run and sample a stream request names; only a session granted the ``stream`` capability may."""
    if session.anonymous or protocol.CAPABILITY_STREAM not in session.capabilities:
        raise NotConfigured(
            f"stream requests need a session granted the {protocol.CAPABILITY_STREAM!r} capability "
            '(POST /session with it in "capabilities")'
        )
    value = request.headers.get(protocol.SAMPLE_HEADER)
    if value is None:
        raise MalformedBody(f"a stream request names its sample in {protocol.SAMPLE_HEADER}: '<run_id>/<sample_id>'")
    try:
        return protocol.parse_sample_header(value)
    except ValueError as exc:
        raise MalformedBody(str(exc)) from None


def _same_stream(kept: KeptAnswer, session: Session) -> None:
    """409 unless ``session`` captures and encodes as the session that produced ``kept`` did."""
    capture, encoding = session.capture.spec, session.encoding
    if (kept.capture, kept.encoding) != (capture, encoding):
        raise AnswerMismatch(
            f"sample {kept.sample_id!r} of run {kept.run_id!r} was computed with capture {kept.capture!r} in "
            f"encoding {kept.encoding!r}; this session has capture {capture!r} in encoding {encoding!r}"
        )


def _publisher(
    stream: AnswerStream, aux_hidden_states: torch.Tensor, inputs: GenerateInputs
) -> Callable[[torch.Tensor, int], None]:
    """The projection's progress callback for a streamed answer: its layout first, then each watermark."""
    started = False

    def on_rows(probs: torch.Tensor, rows: int) -> None:
        nonlocal started
        if not started:
            started = True
            stream.begin(streamed_layout(aux_hidden_states, probs, inputs.input_ids, inputs.loss_mask))
        if rows:
            stream.advance(rows)

    return on_rows


def _consume(task: asyncio.Future[Any]) -> None:
    """Retrieve the outcome of a computation nobody awaited any more (no "never retrieved" warning)."""
    if not task.cancelled():
        task.exception()
