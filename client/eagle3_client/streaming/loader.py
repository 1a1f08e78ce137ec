"""Loaders of DFlash-family, DSpark, ViSpec and MSD batches from the stream, with the lifecycle of upstream's
``FeatureDataLoader``.

Upstream's loader materializes EAGLE-3 batches only. :class:`DFlashFeatureLoader` yields
upstream's ``DFlashTargetBatch`` (hidden states of the run's layers, logits when captured, the
request's tensors), :class:`DSparkFeatureLoader` its ``DSparkTargetBatch`` (built by
:func:`eagle3_client.capture.dspark_batch`, as ``RemoteDSparkTargetModel.generate_batch``
builds it), :class:`VispecFeatureLoader` and :class:`MSDFeatureLoader` its ``VispecTargetBatch``
and ``MSDTargetBatch`` (built by :func:`~eagle3_client.capture.vispec_batch` and
:func:`~eagle3_client.capture.msd_batch`, as the remote ViSpec and MSD adapters build them, with
the image token id the run names: the one its appliances named). All otherwise behave as
upstream's: one lease at a time, the previous batch's lease acked (and its store handle released)
on the next pull, ``consume_now`` to ack early, iteration ending when the run is closed or the
loader is. Each refuses a run of another capture, naming the loader that reads it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from eagle3_client import protocol
from eagle3_client.capture import (
    CAPTURE_DFLASH,
    CAPTURE_DSPARK,
    CAPTURE_MSD,
    CAPTURE_VISPEC,
    KEY_HIDDEN_STATES,
    KEY_LOGITS,
    dflash_batch_type,
    dspark_batch,
    msd_batch,
    vispec_batch,
)
from eagle3_client.streaming.queues import StreamError
from eagle3_client.streaming.store import ApplianceFeatureStore
from eagle3_client.streaming.stream_queue import StreamQueue

__all__ = ["DFlashFeatureLoader", "DSparkFeatureLoader", "MSDFeatureLoader", "VispecFeatureLoader"]

logger = logging.getLogger(__name__)

# The loader of each capture kind's runs, and how a refusal names the kind.
_LOADERS = {
    CAPTURE_DFLASH: "DFlashFeatureLoader",
    CAPTURE_DSPARK: "DSparkFeatureLoader",
    CAPTURE_VISPEC: "VispecFeatureLoader",
    CAPTURE_MSD: "MSDFeatureLoader",
}
_NAMES = {CAPTURE_DSPARK: "DSpark", CAPTURE_VISPEC: "ViSpec", CAPTURE_MSD: "MSD"}


class _StreamLoader:
    """The lifecycle the loaders share; a subclass names the capture kind it reads (``KIND``) and builds the batch."""

    KIND: str

    def __init__(self, queue: StreamQueue, store: ApplianceFeatureStore, *, acquire_poll_interval: float = 0.05):
        if acquire_poll_interval <= 0:
            raise ValueError(f"acquire_poll_interval must be positive, got {acquire_poll_interval}")
        capture = store.capture
        if capture.is_eagle3:
            raise ValueError("this run streams EAGLE-3 batches: use upstream's FeatureDataLoader")
        if capture.kind != self.KIND:
            raise ValueError(
                f"this run streams {_NAMES.get(capture.kind, capture.label)} batches: use {_LOADERS[capture.kind]}"
            )
        self._queue = queue
        self._store = store
        self._poll = acquire_poll_interval
        self._lease: Any = None
        self._handle: Any = None
        self._closed = False
        # The request tensors the last batch was computed from (input_ids, attention_mask, loss_mask,
        # unshifted): what a trainer checks against its own batch (a ViSpec batch holds shifted copies).
        self.inputs: dict[str, Any] = {}

    def _batch(self, tensors: dict[str, Any]) -> Any:
        raise NotImplementedError

    def __iter__(self) -> _StreamLoader:
        return self

    def __next__(self) -> Any:
        self.consume_now()
        if self._closed:
            raise StopIteration
        lease = self._queue.acquire()
        while lease is None:
            if self._queue.is_closed or self._closed:
                raise StopIteration
            time.sleep(self._poll)
            lease = self._queue.acquire()
        try:
            tensors, handle = self._store.get(lease.ref)
        except Exception:
            self._queue.fail(lease)
            raise
        self._lease, self._handle = lease, handle
        self.inputs = {k: tensors[k] for k in protocol.GENERATE_INPUT_KEYS if k in tensors}
        return self._batch(tensors)

    def consume_now(self) -> None:
        """Ack the last batch's lease now (it is otherwise acked on the next pull)."""
        if self._handle is not None:
            self._store.release(self._handle)
            self._handle = None
        if self._lease is not None:
            lease, self._lease = self._lease, None
            try:
                self._queue.ack(lease)
            except StreamError as exc:  # as upstream's loader: logged (its lease ran out: redelivered)
                logger.warning("ack of sample %s failed: %s", lease.ref.sample_id, exc)

    def close(self) -> None:
        self.consume_now()
        self._queue.close()
        self._closed = True

    def __enter__(self) -> _StreamLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class DFlashFeatureLoader(_StreamLoader):
    """Iterator over ``DFlashTargetBatch`` from a DFlash-family run's stream (see the module docstring)."""

    KIND = CAPTURE_DFLASH

    def _batch(self, tensors: dict[str, Any]) -> Any:
        return dflash_batch_type()(
            hidden_states=tensors[KEY_HIDDEN_STATES],
            input_ids=tensors["input_ids"],
            attention_mask=tensors["attention_mask"],
            loss_mask=tensors["loss_mask"],
            logits=tensors.get(KEY_LOGITS),
            position_ids=tensors.get("position_ids"),
            seq_lens=tensors.get("seq_lens"),
            doc_remaining=tensors.get("doc_remaining"),
        )


class DSparkFeatureLoader(_StreamLoader):
    """Iterator over ``DSparkTargetBatch`` from a DSpark run's stream (see the module docstring)."""

    KIND = CAPTURE_DSPARK

    def _batch(self, tensors: dict[str, Any]) -> Any:
        input_ids = tensors["input_ids"]
        packing = {k: tensors[k] for k in protocol.PACKING_KEYS if k in tensors} or None
        return dspark_batch(
            tensors.get("target_hidden_states"),
            tensors.get("target_last_hidden_states"),
            input_ids,
            tensors["loss_mask"],
            packing,
            input_ids.device,
        )


class _VisionLoader(_StreamLoader):
    """A ViSpec or MSD run's loader: the image token id comes from the run (the one its appliances named);
    ``BUILD`` is the batch builder the remote adapter uses too (:mod:`eagle3_client.capture`)."""

    BUILD: Callable[..., Any]

    def __init__(self, queue: StreamQueue, store: ApplianceFeatureStore, *, acquire_poll_interval: float = 0.05):
        super().__init__(queue, store, acquire_poll_interval=acquire_poll_interval)
        image_token_id = store.description.image_token_id
        if image_token_id is None:
            raise ValueError(
                f"run {queue.run_id!r} names no image token id: it was not produced by a producer that "
                "streams ViSpec and MSD runs"
            )
        self._image_token_id: int = image_token_id

    def _batch(self, tensors: dict[str, Any]) -> Any:
        ids = tensors["input_ids"]
        build = type(self).BUILD
        return build(tensors, ids, tensors["attention_mask"], tensors["loss_mask"], self._image_token_id, ids.device)


class VispecFeatureLoader(_VisionLoader):
    """Iterator over ``VispecTargetBatch`` from a ViSpec run's stream (see the module docstring)."""

    KIND = CAPTURE_VISPEC
    BUILD = vispec_batch


class MSDFeatureLoader(_VisionLoader):
    """Iterator over ``MSDTargetBatch`` from an MSD run's stream (see the module docstring)."""

    KIND = CAPTURE_MSD
    BUILD = msd_batch
