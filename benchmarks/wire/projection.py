"""The supervision projection alone, in this process: pooled blocks against the reference code."""

from __future__ import annotations

import statistics
import time

import torch

from benchmarks.wire.cases import Case
from eagle3_appliance.core.inputs import VocabMapping
from eagle3_appliance.model.projection import project_into
from eagle3_appliance.model.supervision import reference_projection
from eagle3_client.synthetic import vocab_mapping
from eagle3_client.transports.buffers import BufferPool

__all__ = ["run_projection"]


def _median_seconds(fn, reps: int) -> float:  # noqa: ANN001 - any zero-argument callable
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_projection(case: Case, vocab: int, hidden: int, *, reps: int = 5) -> dict[str, float | bool]:
    """Median milliseconds of ``project_into`` (warm pool) and of ``reference_projection``, and bit-equality."""
    gen = torch.Generator().manual_seed(0)
    b, t = case.batch_size, case.seq_len
    logits = torch.randn(b, t, vocab, generator=gen) * 4
    aux = torch.randn(b, t, 3 * hidden, generator=gen)
    input_ids = torch.randint(0, vocab, (b, t), generator=gen)
    loss_mask = torch.randint(0, 2, (b, t), generator=gen)
    mapping = VocabMapping(*vocab_mapping(vocab, min(case.draft_vocab, vocab)))
    pool = BufferPool()

    def pooled() -> None:
        project_into(aux, logits, input_ids, loss_mask, mapping, alloc=pool.empty)

    def reference() -> None:
        reference_projection(aux, logits, input_ids, loss_mask, mapping)

    pooled()  # warm the pool
    pooled_s = _median_seconds(pooled, reps)
    reference_s = _median_seconds(reference, max(1, reps // 2))
    got = project_into(aux, logits, input_ids, loss_mask, mapping, alloc=pool.empty)
    want = reference_projection(aux, logits, input_ids, loss_mask, mapping)
    exact = all(got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]) for k in want)
    return {"projection_ms": pooled_s * 1e3, "reference_projection_ms": reference_s * 1e3, "projection_exact": exact}
