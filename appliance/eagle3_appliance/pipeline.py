"""``/generate`` from request to answer, one step after the other, each in its own module.

::

    decode and validate  (validation)      body -> GenerateInputs, against the server's limits
    choose the transfer  (choose_transfer) wire, our group, or upstream's NCCL: decided here only
    admit                (admission)       bounded queue, 503 + Retry-After beyond it
    forward              (target)          the model, aux-layer captures, the LM head's input if needed
    supervise            (supervision)     the answer in the session's encoding, into reused memory
    prepare              (transfer)        host copies, or device tensors ready for a group send
    send                 (transfer)        HTTP body, or metadata + group sends

Forward, supervise and prepare run on :class:`ModelRunner`, the one thread that touches the
model (the aux-layer hooks write into one capture slot, so forwards must not overlap, and a
single worker thread gives that ordering without a lock the event loop would block on). With
micro-batching on, jobs of one sequence length go through :class:`MicroBatcher`, which runs
them as one stacked forward on the same thread and through the same steps; either way the
request time limit, the queue accounting and the metrics are the same.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from sanic import Request

from eagle3_appliance import supervision
from eagle3_appliance.admission import Admission, Ticket
from eagle3_appliance.buffers import ServerBuffers
from eagle3_appliance.errors import MalformedBody, NotConfigured, Unavailable
from eagle3_appliance.group_plane import LINK_KEY, GroupTransfer
from eagle3_appliance.inputs import GenerateInputs, VocabMapping
from eagle3_appliance.limits import ServingLimits, TargetShape, derive_limits
from eagle3_appliance.metrics import Metrics
from eagle3_appliance.microbatch import MicroBatcher
from eagle3_appliance.sessions import Session
from eagle3_appliance.settings import Settings
from eagle3_appliance.target import ForwardOutputs, Target
from eagle3_appliance.transfer import Transfer, WireTransfer
from eagle3_appliance.upstream_nccl import upstream_transfer
from eagle3_appliance.validation import decode_body, validate_generate
from eagle3_client import protocol
from eagle3_client.encodings import PROBS, Encoding, parse_encoding

__all__ = ["Job", "ModelRunner", "Pipeline", "choose_transfer"]

T = TypeVar("T")


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


@dataclass
class Job:
    """One admitted ``/generate``: what to compute and how it will leave."""

    inputs: GenerateInputs
    mapping: VocabMapping
    encoding: Encoding
    transfer: Transfer
    ticket: Ticket


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
        self.batcher: MicroBatcher[Job, dict[str, torch.Tensor]] | None = None
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
        async with self.admission.admit() as ticket:  # 503 + Retry-After when the queue is full
            job = Job(inputs, mapping, encoding, transfer, ticket)
            answer = await self.compute(job)
            tier = await transfer.send(request, answer, ticket, headers)
            self.metrics.observe_generate(ticket, sequences=inputs.batch_size, tokens=inputs.tokens)
            self.metrics.record_sent(tier, encoding.name, ticket.nbytes)

    async def compute(self, job: Job) -> dict[str, torch.Tensor]:
        """Forward, supervise and prepare ``job`` on the model thread, within ``--request-timeout``."""
        if self.batcher is not None:
            work = self.batcher.submit(job, seq_len=job.inputs.seq_len, tokens=job.inputs.tokens)
        else:
            work = self._run_alone(job)
        timeout = self.settings.request_timeout
        try:
            return await asyncio.wait_for(work, timeout=timeout)
        except asyncio.TimeoutError:
            raise Unavailable(
                f"/generate exceeded this server's request time limit of {timeout:g} s "
                "(waiting for the model plus computing); retry later or send smaller batches",
                headers=self.admission.retry_after(),
            ) from None

    async def _run_alone(self, job: Job) -> dict[str, torch.Tensor]:
        return (await self._run_group([job]))[0]

    async def _run_group(self, jobs: list[Job]) -> list[dict[str, torch.Tensor]]:
        return await self.runner.run(self._compute_on_model_thread, jobs)

    @torch.no_grad()
    def _compute_on_model_thread(self, jobs: list[Job]) -> list[dict[str, torch.Tensor]]:
        """One forward for all ``jobs`` (stacked when there are several), then each job's answer."""
        for job in jobs:
            job.ticket.begin_compute()
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
            for job in jobs:
                job.ticket.forward_done()
            return [job.transfer.prepare(answer) for job, answer in zip(jobs, answers, strict=True)]
        finally:
            for job in jobs:
                job.ticket.end_compute()
