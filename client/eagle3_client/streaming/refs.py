"""Upstream's ``SampleRef`` and ``Lease`` from the queue's JSON, and back.

The queue and the appliances speak :class:`eagle3_client.protocol.StreamRef` (JSON, dtypes by
name); upstream's ``FeatureDataLoader`` wants its own frozen dataclasses. NeMo AutoModel is
imported here only, when a stream is opened.

Upstream's ``FeatureAlgorithm`` has no ViSpec or MSD member (its ``SampleRef`` refuses any other
algorithm), so their leases carry a :class:`VisionSampleRef`: the same fields, the algorithm by
name. Only our loaders read those runs; upstream's loader refuses the reference.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from eagle3_client.capture import CAPTURE_VLM
from eagle3_client.protocol import LeaseJSON, StreamRef

__all__ = ["VisionSampleRef", "from_upstream", "to_upstream", "upstream_lease"]


def _streaming() -> Any:
    try:
        from nemo_automodel.components.speculative.streaming import queue, refs
    except ImportError as exc:  # pragma: no cover - the integration needs AutoModel
        raise ImportError(
            "the stream's consumer side speaks NeMo AutoModel's streaming API: install nemo-automodel>=0.7 "
            "(`make automodel`)"
        ) from exc
    return refs, queue


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r} in a sample reference")
    return dtype


@dataclass(frozen=True)
class VisionSampleRef:
    """Upstream's ``SampleRef`` fields for a ViSpec or MSD sample (``algorithm``: ``"vispec"`` or ``"msd"``)."""

    sample_id: str
    run_id: str
    store_uri: str
    feature_keys: dict[str, str]
    feature_specs: dict[str, Any]  # upstream's FeatureSpec by name
    algorithm: str
    schema_version: int
    num_tokens: int
    estimated_bytes: int
    target_model_version: str
    draft_weight_version: str


def to_upstream(ref: StreamRef) -> Any:
    """Upstream's ``SampleRef`` for ``ref`` (its own checks apply: required features per algorithm);
    a :class:`VisionSampleRef` for a ViSpec or MSD sample."""
    refs, _ = _streaming()
    vision = ref.algorithm in CAPTURE_VLM
    make = VisionSampleRef if vision else refs.SampleRef
    return make(
        sample_id=ref.sample_id,
        run_id=ref.run_id,
        store_uri=ref.store_uri,
        feature_keys=dict(ref.feature_keys),
        feature_specs={k: refs.FeatureSpec(shape, _dtype(d)) for k, (shape, d) in ref.feature_specs.items()},
        algorithm=ref.algorithm if vision else refs.FeatureAlgorithm(ref.algorithm),
        schema_version=ref.schema_version,
        num_tokens=ref.num_tokens,
        estimated_bytes=ref.estimated_bytes,
        target_model_version=ref.target_model_version,
        draft_weight_version=ref.draft_weight_version,
    )


def from_upstream(ref: Any) -> StreamRef:
    """The JSON form of upstream's ``SampleRef`` (what a queue carries)."""
    return StreamRef(
        sample_id=ref.sample_id,
        run_id=ref.run_id,
        store_uri=ref.store_uri,
        feature_keys=dict(ref.feature_keys),
        feature_specs={
            k: (tuple(spec.shape), str(spec.dtype).removeprefix("torch.")) for k, spec in ref.feature_specs.items()
        },
        algorithm=getattr(ref.algorithm, "value", ref.algorithm),  # upstream's enum, or a VisionSampleRef's name
        schema_version=ref.schema_version,
        num_tokens=ref.num_tokens,
        estimated_bytes=ref.estimated_bytes,
        target_model_version=ref.target_model_version,
        draft_weight_version=ref.draft_weight_version,
    )


def upstream_lease(lease: LeaseJSON, leased_at: float | None = None) -> Any:
    """Upstream's ``Lease`` for a queue's lease: its deadline on this process's monotonic clock,
    from ``leased_at`` (when the queue granted it; now by default).

    ``lease_id`` is the queue's (a string): the loader only hands the lease back to our queue.
    """
    _, queue = _streaming()
    start = time.monotonic() if leased_at is None else leased_at
    return queue.Lease(
        ref=to_upstream(lease.ref),
        deadline=start + lease.visibility_timeout_s,
        visibility_timeout=queue.VisibilityTimeout(lease.visibility_timeout_s),
        redelivery_count=lease.redelivery_count,
        lease_id=lease.lease_id,
    )
