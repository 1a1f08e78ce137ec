"""The consumer's ``FeatureStore``: a leased sample's tensors, claimed from the appliance that computed them.

A reference names its appliance (``store_uri`` ``appliance://host:port``). :meth:`ApplianceFeatureStore.get`
opens one remote target per appliance (a session, its negotiated data plane: NCCL, gloo or the
wire) and claims the kept answer, which comes with the request's tensors; it decodes the
supervision exactly as ``generate_batch`` does (so the batch is bit-identical to the
co-located wrapper's) and returns upstream's feature names.

When the appliance is gone (killed, or restarted without its answers), the producer computes
the sample again elsewhere and moves its reference on the queue; ``get`` follows it there,
for at most ``claim_timeout`` seconds. A reference of another model than the run's, of
another run, or of another draft family than the store's capture (a DSpark sample claimed for
a DFlash run, say: both have ``hidden_states``, of other layers) is refused
(:class:`~eagle3_client.streaming.queues.RunMismatch`); so is a claim the appliance refuses
because the answer was computed with another capture than the store's.

``release`` drops nothing: an answer is dropped when its lease is acked
(:class:`eagle3_client.streaming.stream_queue.StreamQueue`), so that a trainer that dies
between the two leaves the answer for the sample's next delivery.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import Any

import orjson
import torch

from eagle3_client import protocol
from eagle3_client.capture import DSPARK_FEATURES, Capture
from eagle3_client.encodings import decode_supervision, parse_encoding
from eagle3_client.errors import RemoteTargetError, TargetHTTPError, TargetUnreachable
from eagle3_client.protocol import RunDescription, StreamRef
from eagle3_client.remote.core import RemoteTarget
from eagle3_client.streaming.queues import QueueBackend, RunMismatch, StreamError, UnknownSample
from eagle3_client.streaming.refs import from_upstream

__all__ = ["ApplianceFeatureStore", "owner_url"]

logger = logging.getLogger(__name__)

_SCHEME = "appliance://"
_RETRY_S = 0.5  # between claims of a sample whose appliance is gone, while the producer moves it
_SUSPECT_S = 2.0  # a claim failed this recently: its appliance is not answering
CLAIM_STALL_S = 0.5  # a claim without its answer this long is stalled (read-ahead lets a spare reader go on)
_RELEASE_TIMEOUT_S = 2.0  # an appliance answers a release at once (its event loop does), or is not answering


def owner_url(store_uri: str) -> str:
    """The HTTP URL of the appliance a reference names (``appliance://host:port``)."""
    if not store_uri.startswith(_SCHEME) or not store_uri[len(_SCHEME) :]:
        raise StreamError(f"store_uri {store_uri!r} is not an appliance://host:port this store can claim from")
    return "http://" + store_uri[len(_SCHEME) :]


def _store_base() -> Any:
    from nemo_automodel.components.speculative.streaming import store

    return store


class ApplianceFeatureStore(_store_base().FeatureStore):  # type: ignore[misc]
    """Upstream's ``FeatureStore`` over the appliances of one run (see the module docstring)."""

    def __init__(
        self,
        queue: QueueBackend,
        description: RunDescription,
        *,
        device: torch.device | str = "cpu",
        claim_timeout: float = 300.0,
        **options: Any,
    ) -> None:
        self._queue = queue
        self.description = description
        self.capture = Capture.parse(description.capture)
        self.encoding = parse_encoding(description.encoding)
        self._device = torch.device(device)
        self._claim_timeout = claim_timeout
        self.stall_s = CLAIM_STALL_S
        # Each appliance is a target of its own: its answers live there, so a claim has no failover
        # (nothing to wait for: it is back or not). A claim computes nothing, its answer starts at
        # once: a server silent for 5 s is frozen or gone, and the sample is looked for where the
        # producer moved it.
        self._options = {"failover_timeout": 0.5, "generate_timeout": 5.0, **options}
        self._claims: dict[str, list[float]] = {}  # appliance URL -> start times of claims in flight
        self._failed: dict[str, float] = {}  # appliance URL -> when a claim there last failed
        self._answered: dict[str, float] = {}  # appliance URL -> when a claim there last got its answer
        self._targets: dict[str, RemoteTarget] = {}
        self._held: dict[str, dict[str, torch.Tensor]] = {}  # read-ahead samples, by sample id
        self._lock = threading.Lock()

    # -- upstream's FeatureStore ----------------------------------------------------------

    def put(self, sample_id: str, tensors: Any, **kwargs: Any) -> Any:
        raise TypeError(
            "appliances keep the stream's answers: samples are put by `eagle3-appliance produce`, not by a consumer"
        )

    def get(self, ref: Any, device: torch.device | None = None) -> tuple[dict[str, torch.Tensor], Any]:
        """The tensors of ``ref``'s sample on ``device`` (the store's by default), and a handle.

        A sample the queue's read-ahead already claimed is handed over from memory.
        """
        stream_ref = from_upstream(ref)
        with self._lock:
            tensors = self._held.pop(stream_ref.sample_id, None)
        if tensors is None or (device is not None and torch.device(device) != self._device):
            tensors = self.fetch(stream_ref, device)
        handle = _store_base().StoreHandle(store=self, sample_id=ref.sample_id, ref=ref)
        return tensors, handle

    def fetch(self, ref: StreamRef, device: torch.device | None = None) -> dict[str, torch.Tensor]:
        """Claim ``ref``'s sample from its appliance (checked, followed if moved) and decode it."""
        self._check(ref)
        answer = self._claim(ref)
        return self._features(answer.tensors, device or self._device)

    def hold(self, sample_id: str, tensors: dict[str, torch.Tensor]) -> None:
        """Keep a read-ahead sample's tensors until the loader's ``get`` asks for them."""
        with self._lock:
            self._held[sample_id] = tensors

    def drop_held(self, sample_id: str) -> None:
        with self._lock:
            self._held.pop(sample_id, None)

    def release(self, handle: Any) -> None:
        """Nothing to drop here: the answer is dropped when the sample's lease is acked."""

    def gc(self) -> int:
        return 0

    def health(self) -> Any:
        """The appliances this store has claimed from, summed (``GET /stream/runs``)."""
        resident = count = high = low = 0
        paused = False
        for target in list(self._targets.values()):
            try:
                body = target._any(lambda s: s.control.request("GET", protocol.EP_STREAM_RUNS, s.control.read_json))
            except RemoteTargetError:
                continue
            resident += int(body.get("resident_bytes", 0))
            count += int(body.get("resident_samples", 0))
            high += int(body.get("high_watermark_bytes", 0))
            low += int(body.get("low_watermark_bytes", 0))
            paused = paused or bool(body.get("paused"))
        return _store_base().StoreHealth(
            resident_bytes=resident,
            capacity_bytes=high,
            sample_count=count,
            high_watermark_hit=paused,
            low_watermark_hit=resident <= low,
        )

    def close(self) -> None:
        with self._lock:
            targets, self._targets = list(self._targets.values()), {}
        for target in targets:
            target.close()

    # -- ours -----------------------------------------------------------------------------

    def drop_acked(self, ref: StreamRef) -> None:
        """Tell ``ref``'s appliance its answer may go (its lease was acked); best effort, the producer sweeps.

        Not sent to an appliance that is not answering claims now, and given up after
        :data:`_RELEASE_TIMEOUT_S`: the producer's sweep releases what is acked and still kept.
        """
        try:
            if self.suspect(ref.store_uri):
                logger.info(
                    "release of sample %s left to the producer: %s is not answering", ref.sample_id, ref.store_uri
                )
                return
            url = owner_url(ref.store_uri)
            content = orjson.dumps(protocol.ReleaseRequest(ref.run_id, (ref.sample_id,)).to_json())

            def release(s: Any) -> Any:
                return s.control.request(
                    "POST",
                    protocol.EP_STREAM_RELEASE,
                    s.control.read_json,
                    content=content,
                    content_type=protocol.JSON,
                    retries=False,
                    timeout=_RELEASE_TIMEOUT_S,
                )

            self._target(url)._any(release)
        except (RemoteTargetError, StreamError) as exc:
            if isinstance(exc, TargetUnreachable):
                with self._lock:
                    self._failed[owner_url(ref.store_uri)] = time.monotonic()
            logger.info("release of sample %s on %s not confirmed: %s", ref.sample_id, ref.store_uri, exc)

    def suspect(self, store_uri: str) -> bool:
        """Whether the appliance at ``store_uri`` is not answering claims now: one failed in the last
        :data:`_SUSPECT_S` seconds, or one has waited longer than
        :data:`CLAIM_STALL_S` and none has been answered since it
        began (a slow appliance still answers some; a frozen one answers none)."""
        url = owner_url(store_uri)
        now = time.monotonic()
        with self._lock:
            failed = self._failed.get(url)
            oldest = min(self._claims.get(url) or [now])
            answered = self._answered.get(url, float("-inf"))
        stalled = now - oldest > self.stall_s and answered < oldest
        return (failed is not None and now - failed < _SUSPECT_S) or stalled

    def _check(self, ref: StreamRef) -> None:
        if ref.algorithm != self.capture.algorithm:
            raise RunMismatch(
                f"sample {ref.sample_id!r} of run {ref.run_id!r} is a {ref.algorithm} sample; this store reads "
                f"{self.capture.algorithm} answers (capture {self.description.capture!r}): refused"
            )
        if ref.run_id != self._queue.run_id:
            raise RunMismatch(f"sample {ref.sample_id!r} belongs to run {ref.run_id!r}, not {self._queue.run_id!r}")
        if ref.target_model_version != self.description.model_fingerprint:
            raise RunMismatch(
                f"sample {ref.sample_id!r} of run {ref.run_id!r} was computed by model "
                f"{ref.target_model_version!r}; the run's model is {self.description.model_fingerprint!r}: refused"
            )

    def _target(self, url: str) -> RemoteTarget:
        with self._lock:
            target = self._targets.get(url)
            if target is None:
                # Its session asks for the encoding the answers are kept in (a claim checks it).
                options = {**self._options, "encoding": self.encoding.name}
                target = RemoteTarget([url], device=self._device, capture=self.capture, **options)
                self._targets[url] = target
            return target

    def _claim(self, ref: StreamRef) -> Any:
        """The kept answer of ``ref``'s sample; followed to where the producer moved it if its appliance is gone."""
        deadline = time.monotonic() + self._claim_timeout
        current = ref
        while True:
            url = owner_url(current.store_uri)
            started = time.monotonic()
            with self._lock:
                self._claims.setdefault(url, []).append(started)
            try:
                try:
                    answer = self._target(url).claim(current.run_id, current.sample_id)
                    with self._lock:
                        self._answered[url] = time.monotonic()
                finally:
                    with self._lock:
                        self._claims[url].remove(started)
            except (TargetUnreachable, TargetHTTPError) as exc:
                if isinstance(exc, TargetHTTPError) and exc.status == 409:  # kept with another capture
                    raise RunMismatch(f"{url} refused the claim of sample {current.sample_id!r}: {exc}") from exc
                if isinstance(exc, TargetHTTPError) and exc.status not in (404, 410, 503):
                    raise
                reason = str(exc)
                if not isinstance(exc, TargetHTTPError) or exc.status == 503:  # 404: it moved; the server is fine
                    with self._lock:
                        self._failed[url] = time.monotonic()
            else:
                fingerprint = self._target(url)._servers[0].fingerprint
                if fingerprint is not None and fingerprint != self.description.model_fingerprint:
                    raise RunMismatch(
                        f"{url} serves model {fingerprint!r}, not the run's {self.description.model_fingerprint!r}"
                    )
                return answer
            if time.monotonic() >= deadline:
                raise UnknownSample(
                    f"sample {ref.sample_id!r} of run {ref.run_id!r}: no appliance gave its answer within "
                    f"{self._claim_timeout:g} s (last from {current.store_uri}: {reason}); is the producer running?"
                )
            # Where the queue says the answer is now (the producer moves it after computing it again).
            status = self._queue.locate(ref.sample_id)
            if status is not None and status.store_uri != current.store_uri:
                logger.warning("sample %s moved from %s to %s", ref.sample_id, current.store_uri, status.store_uri)
                current = dataclasses.replace(current, store_uri=status.store_uri)
            else:
                time.sleep(_RETRY_S)

    def _features(self, tensors: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
        """Upstream's feature names: the supervision decoded as ``generate_batch`` decodes it, the request's tensors."""
        out: dict[str, torch.Tensor] = {}
        if self.capture.is_eagle3:
            decoded = decode_supervision(
                tensors, self.encoding, device=device, draft_vocab=self.description.draft_vocab_size
            )
            out["aux_hidden_states"] = tensors["aux_hidden_states"].to(device)
            out["target_probs"] = decoded.target_probs
            out["position_mask"] = decoded.position_mask
        elif self.capture.is_dspark:
            for name, key in DSPARK_FEATURES.items():
                out[name] = tensors[key].to(device)
        else:  # DFlash (hidden states, logits when captured), ViSpec and MSD (VLM_KEYS): as kept
            for key in self.capture.keys:
                out[key] = tensors[key].to(device)
        for key in protocol.SAMPLE_INPUT_KEYS:
            if key in tensors:
                out[key] = tensors[key].to(device)
        return out
