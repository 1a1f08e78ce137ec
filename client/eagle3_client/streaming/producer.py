"""The producer: has a fleet of appliances compute a run's batches ahead and announces each on the queue.

It moves only control. For every ``(epoch, batch)`` in dataset order it asks an appliance to
compute the answer and keep it (``/stream/produce``, a few requests in flight per appliance, so
that each one's model thread always has the next batch), then puts the reference the appliance
returned on the run's queue. The tensors go from that appliance to whichever trainer claims
the sample.

Guarantees (each one tested by killing something):

* A sample is put once per computation; the queue never delivers an acked sample again, so a
  producer restarted with the same run id resumes: samples the queue already knows are not
  computed again, and the run ends where it stood.
* An appliance that refuses because its resident answers are at the high watermark makes the
  producer pause on it (it retries that sample shortly, here or on another appliance). Two kinds
  of sample may use the room appliances keep free (``X-Eagle3-Priority``): a lost sample a
  trainer holds a lease on (it waits for it, and the samples filling the appliances are queued
  behind it), and the next sample of an in-order run.
* Every ``sweep_interval`` the producer compares the queue with what the appliances keep: a
  sample not yet acked whose appliance is gone (killed, or restarted without its answers) is
  computed again on another appliance and its reference moved on the queue; an acked sample
  whose answer is still kept (its trainer died between the ack and the release) is released.
* An appliance that does not answer the sweep (frozen, or its host unreachable) is *silent*:
  it is sent nothing more until it answers again, and the samples it was computing are computed
  on another appliance too. Whichever copy is done first is put on the queue; the other is
  released when it comes (or by a later sweep).
* With ``in_order`` a run's samples are put on its queue in the plan's order (computed in
  parallel, each held back until those before it are put), so that a single trainer trains in
  that order; without it each is put as soon as it is computed (a slow appliance then holds back
  only its own samples).
* Once every sample is on the queue the run is sealed; when the queue reports the run closed
  (every sample acked), the appliances drop what is left of the run and :meth:`Producer.run` returns.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from eagle3_client import protocol, wire
from eagle3_client.capture import EAGLE3, Capture
from eagle3_client.errors import RemoteTargetError, TargetHTTPError, TargetOverloaded
from eagle3_client.protocol import RunDescription, SampleStatus, StreamRef
from eagle3_client.remote.core import RemoteTarget
from eagle3_client.remote.fleet import Member, is_server_failure
from eagle3_client.remote.request import encode_request
from eagle3_client.remote.session import ServerSession
from eagle3_client.streaming.backends import open_queue
from eagle3_client.streaming.queues import PUT_ACKED, QueueBackend

__all__ = ["ProduceReport", "Producer", "RunPlan", "sample_id", "vision_inputs"]

logger = logging.getLogger(__name__)

_FULL_PAUSE_S = 0.25  # before a refused sample is offered again (the appliance was at its watermark)
_DOWN_POLL_S = 0.2  # while an appliance is out of the rotation (the fleet probes it back)
# An appliance that does not list what it keeps within this (its event loop answers at once, even
# while a forward runs) is frozen or gone: its samples are computed again elsewhere.
_LIST_TIMEOUT_S = 2.0
_LOOK_AHEAD = 64  # how far into the work list a worker looks for a sample that may use the reserve

Batch = Mapping[str, torch.Tensor]


def _store_uri(url: str) -> str:
    """The ``store_uri`` an appliance at ``url`` names in its references (the address it was reached at)."""
    return "appliance://" + url.split("://", 1)[-1].rstrip("/")


def vision_inputs(batch: Batch) -> dict[str, torch.Tensor]:
    """A sample's vision tensors (``pixel_values``, ``image_grid_thw``, ...): every key of its batch
    but the request's own (:data:`eagle3_client.protocol.SAMPLE_INPUT_KEYS`)."""
    return {key: t for key, t in batch.items() if key not in protocol.SAMPLE_INPUT_KEYS}


def _check_vision(capture: Capture, what: str, batch: Batch) -> None:
    """ValueError, before anything is computed, for vision tensors a stream of ``capture`` cannot carry."""
    vision = sorted(vision_inputs(batch))
    if not vision:
        return
    if not capture.takes_vision:
        raise ValueError(
            f"{what} carries vision tensors {vision}: a stream carries them for ViSpec, MSD and DSpark runs only, "
            f"not {capture.label}"
        )
    packed = sorted(set(batch) & set(protocol.PACKING_KEYS))
    if packed:
        raise ValueError(f"{what} carries vision tensors {vision} and packing keys {packed}, not both")


def sample_id(epoch: int, index: int) -> str:
    """The sample id of batch ``index`` of ``epoch``: sortable, so the queue lists a run in dataset order."""
    return f"e{epoch:04d}-b{index:08d}"


@dataclass(frozen=True)
class RunPlan:
    """One run's samples, in the order they are produced: ``(sample id, batch)`` pairs."""

    run_id: str
    samples: Sequence[tuple[str, Batch]]


@dataclass
class ProduceReport:
    """What one :meth:`Producer.run` did."""

    total: int = 0  # samples in the run (all epochs)
    known_at_start: int = 0  # already on the queue when it started (a resumed run)
    computed: int = 0  # answers computed (first time or again)
    recomputed: int = 0  # of those: samples whose appliance was gone
    refused_full: int = 0  # requests refused at an appliance's high watermark
    released_late: int = 0  # acked answers the sweep released
    seconds: float = 0.0
    per_appliance: dict[str, int] = field(default_factory=dict)


class Producer:
    """One run's producer over ``urls`` (see the module docstring).

    ``batches``: one epoch's batches, in order, each with ``input_ids``, ``attention_mask`` and
    ``loss_mask`` (``[B,T]``) and, for packed rows, ``position_ids``, ``seq_lens`` and
    ``doc_remaining``; a ViSpec, MSD or DSpark run's (unpacked) batches may hold their vision tensors
    (``pixel_values``, ``image_grid_thw``, ...) as further keys, sent as the adapters send them.
    ``vocab_mapping``: the two arguments of ``set_vocab_mapping`` (EAGLE-3).
    Other keyword arguments are client options (``auth_token``, timeouts, ``probe_interval``...).
    """

    def __init__(
        self,
        urls: Sequence[str],
        queue_url: str,
        run_id: str,
        batches: Sequence[Batch],
        *,
        epochs: int = 1,
        **kwargs: Any,
    ) -> None:
        if epochs < 1 or not batches:
            raise ValueError(f"a run needs at least one batch and one epoch (got {len(batches)} x {epochs})")
        batches = list(batches)
        plan = RunPlan(run_id, [(sample_id(e, i), b) for e in range(epochs) for i, b in enumerate(batches)])
        self._setup(urls, queue_url, [plan], **kwargs)

    @classmethod
    def for_runs(cls, urls: Sequence[str], queue_url: str, plans: Sequence[RunPlan], **kwargs: Any) -> Producer:
        """One producer for several runs at once (the recipe mode: one run per epoch and trainer rank),
        all computed ahead together, in the order given."""
        producer = cls.__new__(cls)
        producer._setup(urls, queue_url, list(plans), **kwargs)
        return producer

    def _setup(
        self,
        urls: Sequence[str],
        queue_url: str,
        plans: list[RunPlan],
        *,
        capture: Capture = EAGLE3,
        encoding: str = protocol.ENCODING_PROBS,
        vocab_mapping: tuple[torch.Tensor, torch.Tensor] | None = None,
        visibility_timeout: float = 60.0,
        in_flight_per_server: int = 2,
        sweep_interval: float = 1.0,
        in_order: bool = False,
        **options: Any,
    ) -> None:
        if capture.is_eagle3 and vocab_mapping is None:
            raise ValueError("an EAGLE-3 run needs the draft vocabulary: pass vocab_mapping=(ids, mask)")
        if encoding.startswith(protocol.ENCODING_HIDDEN):
            raise ValueError(
                "the 'hidden' encoding needs the trainer to hold the vocab mapping's LM-head rows; "
                "streams carry probs, logits or topk:K"
            )
        if not plans or any(not plan.samples for plan in plans) or len({p.run_id for p in plans}) != len(plans):
            raise ValueError("every run needs at least one sample, and run ids must differ")
        for plan in plans:
            for sid, batch in plan.samples:
                _check_vision(capture, f"sample {sid} of run {plan.run_id}", batch)
        self.plans = {plan.run_id: plan for plan in plans}
        self._batches = {(plan.run_id, sid): batch for plan in plans for sid, batch in plan.samples}
        self.capture = capture
        self.encoding = encoding
        self.vocab_mapping = vocab_mapping
        self.visibility_timeout = visibility_timeout
        self.in_flight = in_flight_per_server
        self.sweep_interval = sweep_interval
        token = options.get("auth_token")
        self.queues: dict[str, QueueBackend] = {
            run_id: open_queue(queue_url, protocol.check_stream_id(run_id, "the run id"), auth_token=token)
            for run_id in self.plans
        }
        options.setdefault("max_in_flight_per_server", in_flight_per_server)
        self.target = RemoteTarget(list(urls), capture=capture, encoding=encoding, **options)
        self.report = ProduceReport(total=len(self._batches))
        self._todo: collections.deque[tuple[str, str, bool]] = collections.deque()  # (run, sample, recompute)
        self._busy: set[tuple[str, str]] = set()  # queued or being computed, not yet put
        self._inflight: dict[tuple[str, str], list[str]] = {}  # being computed: on which appliances
        self._silent: set[str] = set()  # appliances that did not answer the last sweep
        self._urgent: set[tuple[str, str]] = set()  # lost samples a trainer holds a lease on
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._error: BaseException | None = None
        # in_order: a run's samples are put on its queue in plan order (computed in parallel, held
        # back until those before them are put), so that one trainer sees the plan's order.
        self.in_order = in_order
        self._unput: dict[str, collections.deque[str]] = {}  # run -> its samples not yet put, in order
        self._computed: dict[tuple[str, str], StreamRef] = {}  # computed, waiting for their turn
        self._put_lock = threading.Lock()

    @property
    def run_id(self) -> str:
        """The run's id (a producer of one run)."""
        return next(iter(self.plans))

    @property
    def queue(self) -> QueueBackend:
        """The run's queue (a producer of one run)."""
        return self.queues[self.run_id]

    # -- the run ----------------------------------------------------------------------------

    def run(self, timeout: float | None = None) -> ProduceReport:
        """Produce until every run is closed (every sample acked); the report. ``timeout``: give up after it."""
        start = time.monotonic()
        self._connect()
        with self._cond:
            for run_id, plan in self.plans.items():
                known = {s.sample_id for s in self._statuses(run_id)}
                self.report.known_at_start += len(known & {sid for sid, _ in plan.samples})
                if self.in_order:
                    self._unput[run_id] = collections.deque(sid for sid, _ in plan.samples if sid not in known)
                for sid, _ in plan.samples:
                    if sid not in known:
                        self._todo.append((run_id, sid, False))
                        self._busy.add((run_id, sid))
        workers = [
            threading.Thread(target=self._work, args=(m,), name=f"produce-{m.url}-{k}", daemon=True)
            for m in self.target._fleet.members
            for k in range(self.in_flight)
        ]
        for w in workers:
            w.start()
        sealed: set[str] = set()
        open_runs = set(self.plans)
        try:
            while open_runs:
                if self._error is not None:
                    raise self._error
                if timeout is not None and time.monotonic() - start > timeout:
                    states = {run_id: self.queues[run_id].state() for run_id in open_runs}
                    raise TimeoutError(f"runs not closed within {timeout:g} s: {states}")
                with self._cond:
                    busy_runs = {run_id for run_id, _ in self._busy}
                for run_id in sorted(open_runs - busy_runs - sealed):  # every sample is on its queue
                    self.queues[run_id].seal(len(self.plans[run_id].samples))
                    sealed.add(run_id)
                for run_id in sorted(open_runs):
                    if self.queues[run_id].state().closed:
                        open_runs.discard(run_id)
                        self._end_on_appliances(run_id)
                for run_id in sorted(open_runs):
                    self._sweep(run_id)
                self._stop.wait(self.sweep_interval)
        finally:
            self._stop.set()
            with self._cond:
                self._cond.notify_all()
            for w in workers:
                w.join(timeout=30)
        self.report.seconds = time.monotonic() - start
        return self.report

    def close(self) -> None:
        self._stop.set()
        self.target.close()
        for queue in self.queues.values():
            queue.close()

    def __enter__(self) -> Producer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- setting up -------------------------------------------------------------------------

    def _connect(self) -> None:
        """Sessions on every reachable appliance (with the vocab mapping), and the runs on the queue."""
        fleet = self.target._fleet
        fleet.start()
        digest = None
        if self.vocab_mapping is not None:
            ids, mask = self.vocab_mapping
            digest = protocol.mapping_digest(ids)
            payload = wire.encode({"selected_token_ids": ids, "selected_token_mask": mask})
            for member in fleet.members:
                member.server.set_vocab_mapping(payload, 1)  # replayed on every new session
        fingerprints = {m.server.fingerprint for m in fleet.members if m.server.fingerprint}
        if not fingerprints:
            raise RemoteTargetError(
                "no appliance reported a model fingerprint: the stream needs eagle3-appliance servers"
            )
        image_token_id = None
        if self.capture.is_vlm:  # the trainers' image mask: the id the servers name, carried by the run
            named = {m.server.image_token_id for m in fleet.members if m.server.image_token_id is not None}
            if len(named) != 1:
                raise RemoteTargetError(
                    f"a {self.capture.label} run needs the one image token id its appliances name; "
                    f"they named {sorted(named)}"
                )
            image_token_id = named.pop()
        description = RunDescription(
            algorithm=self.capture.algorithm,
            capture=self.capture.spec,
            encoding=self.encoding,
            model_fingerprint=fingerprints.pop(),
            visibility_timeout_s=self.visibility_timeout,
            draft_vocab_size=None if self.vocab_mapping is None else int(self.vocab_mapping[0].numel()),
            mapping_digest=digest,
            image_token_id=image_token_id,
        )
        for queue in self.queues.values():
            queue.open(description)

    def _payload(self, run_id: str, sid: str) -> tuple[bytes, frozenset[str]]:
        batch = self._batches[(run_id, sid)]
        packing = [batch.get(k) for k in protocol.PACKING_KEYS]
        request, payload, _ = encode_request(
            batch["input_ids"],
            batch["attention_mask"],
            batch["loss_mask"],
            *packing,
            capture=self.capture,
            vision=vision_inputs(batch),
        )
        return payload, request.capabilities

    # -- workers: one per in-flight slot of each appliance ------------------------------------

    def _take(self) -> tuple[str, str, bool] | None:
        """The next sample to compute: first one that may use the appliances' reserve (a lost one
        a trainer waits for, the next of an in-order run), else the oldest. Refused samples go
        back to the front: they must not keep those behind them while the appliances are full."""
        with self._cond:
            while not self._todo:
                if self._stop.is_set():
                    return None
                self._cond.wait(0.2)
            first = set(self._urgent)
            for run_id, unput in list(self._unput.items()):  # read without the put lock: a stale head is harmless
                with contextlib.suppress(IndexError):
                    first.add((run_id, unput[0]))
            if first:  # they sit near the front (put there, or first in plan order): look that far only
                for item in itertools.islice(self._todo, _LOOK_AHEAD):
                    if (item[0], item[1]) in first:
                        self._todo.remove(item)
                        return item
            return self._todo.popleft()

    def _give_back(self, item: tuple[str, str, bool]) -> None:
        with self._cond:
            self._todo.appendleft(item)
            self._cond.notify()

    def _give_back_unless_twinned(self, item: tuple[str, str, bool], elsewhere: list[str]) -> None:
        """Offer a sample that was not computed again, unless its other copy is still being computed or was put."""
        with self._cond:
            twinned = bool(elsewhere) or (item[0], item[1]) not in self._busy
        if not twinned:
            self._give_back(item)

    def _work(self, member: Member[ServerSession]) -> None:
        fleet = self.target._fleet
        while not self._stop.is_set():
            if fleet.describe(member)["state"] != "ready" or member.url in self._silent:
                self._stop.wait(_DOWN_POLL_S)  # the fleet's monitor (or the sweep) takes it back
                continue
            item = self._take()
            if item is None:
                return
            run_id, sid, recompute = item
            key = (run_id, sid)
            with self._cond:
                self._inflight.setdefault(key, []).append(member.url)
            with self._put_lock:  # the next sample of an in-order run holds the ones after it back
                unput = self._unput.get(run_id)
                head = unput is not None and len(unput) > 0 and unput[0] == sid
            try:
                try:
                    payload, needs = self._payload(run_id, sid)
                    member.server.require(needs)
                    with self._cond:
                        urgent = key in self._urgent
                    ref = member.server.produce(run_id, sid, payload, priority=urgent or head)
                finally:
                    with self._cond:
                        elsewhere = self._inflight[key]
                        elsewhere.remove(member.url)
                        if not elsewhere:
                            del self._inflight[key]
            except TargetOverloaded:
                self.report.refused_full += 1
                self._give_back_unless_twinned(item, elsewhere)
                self._stop.wait(_FULL_PAUSE_S)
                continue
            except BaseException as exc:
                self._give_back_unless_twinned(item, elsewhere)
                if is_server_failure(exc):
                    fleet.fail(member, exc)
                    continue
                self._error = exc
                self._stop.set()
                return
            try:
                self._announce(ref, recompute, member.url)
            except BaseException as exc:
                self._error = exc
                self._stop.set()
                return

    def _announce(self, ref: StreamRef, recompute: bool, url: str) -> None:
        key = (ref.run_id, ref.sample_id)
        with self._cond:
            # The later of two copies (one computed again while its appliance was silent): not needed.
            late = key not in self._busy or key in self._computed
        if late:
            self._release(ref.run_id, ref.store_uri, [ref.sample_id])
            return
        with self._cond:
            self.report.computed += 1
            self.report.recomputed += recompute
            self.report.per_appliance[url] = self.report.per_appliance.get(url, 0) + 1
        with self._put_lock:
            unput = self._unput.get(ref.run_id)
            if recompute or unput is None or ref.sample_id not in unput:
                self._put(ref)
                return
            self._computed[(ref.run_id, ref.sample_id)] = ref
            while unput and (ref.run_id, unput[0]) in self._computed:
                self._put(self._computed.pop((ref.run_id, unput.popleft())))

    def _put(self, ref: StreamRef) -> None:
        result = self.queues[ref.run_id].put(ref)
        with self._cond:
            self._busy.discard((ref.run_id, ref.sample_id))
            self._urgent.discard((ref.run_id, ref.sample_id))
        if result == PUT_ACKED:  # consumed meanwhile (from its first copy): this one is not needed
            self._release(ref.run_id, ref.store_uri, [ref.sample_id])

    # -- the sweep ----------------------------------------------------------------------------

    def _statuses(self, run_id: str) -> list[SampleStatus]:
        out: list[SampleStatus] = []
        after: str | None = None
        while True:
            page = self.queues[run_id].samples(after, limit=protocol.MAX_STREAM_IDS_PER_REQUEST)
            out.extend(page)
            if len(page) < protocol.MAX_STREAM_IDS_PER_REQUEST:
                return out
            after = page[-1].sample_id

    def _sweep(self, run_id: str) -> None:
        """Compute again what is gone with its appliance; release acked answers still kept (module docstring)."""
        statuses = self._statuses(run_id)  # first: whatever it lists was kept before this reads the appliances
        uris = {s.store_uri for s in statuses} | {_store_uri(m.url) for m in self.target._fleet.members}
        kept = {uri: self._kept(run_id, uri) for uri in uris}
        self._twin_silent(kept)
        late: dict[str, list[str]] = {}
        where = {s.sample_id: s.store_uri for s in statuses}
        for uri, held_there in kept.items():  # answers of samples that moved away (their appliance froze)
            stale = sorted(sid for sid in held_there or () if where.get(sid, uri) != uri)
            if stale:
                late.setdefault(uri, []).extend(stale)
        lost = []
        for status in statuses:
            held = kept[status.store_uri]
            if status.state == "acked":
                if held and status.sample_id in held:
                    late.setdefault(status.store_uri, []).append(status.sample_id)
            elif held is None or status.sample_id not in held:
                lost.append(status)
        if lost:
            # Read the queue again: a sample acked (then released) between the two reads above is
            # not lost. An answer is released only after its ack, so one still not acked now was
            # kept when the appliance was read, if it was kept at all.
            now = {s.sample_id: s for s in self._statuses(run_id)}
            lost = [s for s in lost if (n := now.get(s.sample_id)) is not None and n.state != "acked"]
            lost = [s for s in lost if now[s.sample_id].store_uri == s.store_uri]
        with self._cond:
            for status in lost:
                if status.state == "leased":  # a trainer waits for it: it may use the appliances' reserve
                    self._urgent.add((run_id, status.sample_id))
                if (run_id, status.sample_id) in self._busy:
                    continue
                logger.warning(
                    "sample %s of run %s (%s) is no longer kept by %s: computing it again",
                    status.sample_id,
                    run_id,
                    status.state,
                    status.store_uri,
                )
                self._busy.add((run_id, status.sample_id))
                self._todo.appendleft((run_id, status.sample_id, True))
            self._cond.notify_all()
        for uri, ids in late.items():
            self.report.released_late += self._release(run_id, uri, ids)

    def _twin_silent(self, kept: Mapping[str, set[str] | None]) -> None:
        """Note which appliances are silent; what only silent ones are computing is computed again
        elsewhere (the module docstring)."""
        silent = {m.url for m in self.target._fleet.members if kept.get(_store_uri(m.url), set()) is None}
        with self._cond:
            for url in sorted(silent - self._silent):
                logger.warning(
                    "%s does not answer: nothing more is sent to it, what it computes is computed again", url
                )
            self._silent = silent
            queued = {(run_id, sid) for run_id, sid, _ in self._todo}
            for key, urls in self._inflight.items():
                if key not in queued and all(url in silent for url in urls):
                    self.report.recomputed += 1
                    self._todo.appendleft((*key, False))
            self._cond.notify_all()

    def _member(self, store_uri: str) -> Member[ServerSession] | None:
        for member in self.target._fleet.members:
            if _store_uri(member.url) == store_uri:
                return member
        return None

    def _kept(self, run_id: str, store_uri: str) -> set[str] | None:
        """The sample ids of ``run_id`` the appliance at ``store_uri`` keeps; None when it does not answer."""
        member = self._member(store_uri)
        if member is None:
            return None  # not one of ours: nobody here can ask it; its samples are computed on ours
        path = f"{protocol.EP_STREAM_RUNS}/{run_id}"
        control = member.server.control
        try:
            body = control.request("GET", path, control.read_json, retries=False, timeout=_LIST_TIMEOUT_S)
        except TargetHTTPError as exc:
            return set() if exc.status == 404 else None
        except RemoteTargetError:
            return None
        return set(body.get("samples", []))

    def _release(self, run_id: str, store_uri: str, sample_ids: list[str]) -> int:
        member = self._member(store_uri)
        if member is None:
            return 0
        body = protocol.ReleaseRequest(run_id, tuple(sample_ids)).to_json()
        try:
            return int(member.server.control.post_json(protocol.EP_STREAM_RELEASE, body, retries=False)["released"])
        except (RemoteTargetError, KeyError, TypeError):
            return 0

    def _end_on_appliances(self, run_id: str) -> None:
        for member in self.target._fleet.members:
            control = member.server.control
            try:
                control.request("DELETE", f"{protocol.EP_STREAM_RUNS}/{run_id}", control.read_json, retries=False)
            except RemoteTargetError as exc:
                logger.info("%s: the answers of run %s were not dropped (%s)", member.url, run_id, exc)
