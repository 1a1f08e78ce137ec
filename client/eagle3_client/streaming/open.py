"""``open_stream``: a trainer's ``(queue, store)`` for a run, which upstream's ``FeatureDataLoader`` takes as they are.

::

    from nemo_automodel.components.speculative.streaming import FeatureDataLoader
    from eagle3_client.streaming.open import open_stream

    queue, store = open_stream("appliance://node3:8001", run_id="run-7")   # or redis://host:6379/0
    for batch in FeatureDataLoader(queue, store):                          # Eagle3TargetBatch
        ...

A DFlash-family run is read with ``DFlashFeatureLoader(queue, store)``, a DSpark run with
``DSparkFeatureLoader(queue, store)``, a ViSpec or MSD run with ``VispecFeatureLoader`` or
``MSDFeatureLoader`` (:mod:`eagle3_client.streaming.loader`).

A trainer may start before its producer: ``open_stream`` waits up to ``wait_for_run`` seconds
for the run to be created. The client options (``data_plane``, ``auth_token``, timeouts, ...)
apply to the claims from every appliance; ``device`` is where the batches' tensors land.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from eagle3_client.streaming.backends import open_queue
from eagle3_client.streaming.queues import UnknownRun
from eagle3_client.streaming.store import ApplianceFeatureStore
from eagle3_client.streaming.stream_queue import StreamQueue

__all__ = ["open_stream"]

_POLL_S = 0.5


def open_stream(
    queue_url: str,
    *,
    run_id: str,
    device: torch.device | str = "cpu",
    consumer: str | None = None,
    wait_for_run: float = 600.0,
    claim_timeout: float = 300.0,
    read_ahead: int = 0,
    in_order: bool = False,
    **options: Any,
) -> tuple[StreamQueue, ApplianceFeatureStore]:
    """The run's queue and a store over its appliances (see the module docstring).

    ``claim_timeout``: how long a sample whose appliance is gone may take to be computed again
    elsewhere before ``get`` gives up. ``read_ahead``: samples leased and claimed in the
    background (:class:`~eagle3_client.streaming.stream_queue.StreamQueue`), so that a slow or
    frozen appliance holds back only its own samples; ``in_order``: those are handed out in the
    order the queue leased them (a run produced ``--in-order`` for one trainer) rather than as
    their claims finish. ``auth_token`` (an option) also authenticates to an
    appliance-hosted queue.
    """
    backend = open_queue(queue_url, run_id, auth_token=options.get("auth_token"))
    deadline = time.monotonic() + wait_for_run
    while True:
        try:
            description = backend.open(None)
            break
        except UnknownRun:
            if time.monotonic() >= deadline:
                backend.close()
                raise
            time.sleep(_POLL_S)
    store = ApplianceFeatureStore(backend, description, device=device, claim_timeout=claim_timeout, **options)
    queue = StreamQueue(
        backend, consumer=consumer, on_ack=store.drop_acked, read_ahead=read_ahead, store=store, in_order=in_order
    )
    return queue, store
