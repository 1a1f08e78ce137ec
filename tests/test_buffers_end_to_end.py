"""The issue's reproduction: kept answers of concurrent same-shape batches never share memory.

A client with the default pool (``buffer_pool_mb`` 2048, ``max_in_flight_per_server`` 2) keeps
every batch while more arrive; with micro-batching on the server, the answers of one group
complete together, so the client's two receiving threads ask its pool for blocks of the same
size at the same moment (and the server's pool is asked for each answer of the group). Each
kept batch must be its own: its tensors on memory no other kept batch uses, its values those of
the oracle for its own inputs.

Before the fix (blocks chosen under the pool's lock, owned only after it), 1-4 of the 160 kept
batches shared memory with another in 5 of 6 runs; ``tests/test_buffers.py`` is the check that
fails every time.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from eagle3_appliance.launch import ServerProcess
from eagle3_client import RemoteEagle3TargetModel
from eagle3_client.contract import Eagle3TargetBatch
from eagle3_client.synthetic import random_batch, vocab_mapping
from eagle3_client.transports.buffers import reuse_supported
from tests.oracle import Oracle

pytestmark = pytest.mark.skipif(not reuse_supported(), reason="this torch cannot report storage use counts")

GROUPS, PER_GROUP = 40, 4  # the reproduction: 2-4 of 160 kept batches shared memory
ROWS, SEQ = 2, 32
KEYS = ("aux_hidden_states", "target_probs", "position_mask", "input_ids", "loss_mask")


@pytest.fixture(scope="module")
def batching_server(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("pool-race") / "server.log"
    args = ["--cache-dir", str(cache_dir), "--log-level", "WARNING", "--microbatch-wait-ms", "20"]
    with ServerProcess(args, log_path=log) as proc:
        yield proc


def _close_to(got: Eagle3TargetBatch, want: dict[str, torch.Tensor], where: str) -> None:
    """Micro-batched forwards round differently from a lone one (``tests/test_microbatch.py``), by
    ~1e-6; another batch's tensors differ by the size of the values themselves."""
    for key, expected in want.items():
        actual = getattr(got, key).cpu()
        assert actual.dtype == expected.dtype and actual.shape == expected.shape, f"{where} {key}"
        if expected.is_floating_point():
            torch.testing.assert_close(
                actual, expected, rtol=1e-4, atol=1e-5, msg=lambda m, key=key: f"{where} {key}: {m}"
            )
        elif key != "position_mask":  # a near-tie may flip an argmax
            assert torch.equal(actual, expected), f"{where} {key}"


def test_kept_concurrent_batches_each_hold_their_own_answer(batching_server: ServerProcess, oracle: Oracle) -> None:
    ids, mask = vocab_mapping(oracle.vocab_size, 128, seed=3)
    inputs = [random_batch(oracle.vocab_size, ROWS, SEQ, seed=100 + n) for n in range(GROUPS * PER_GROUP)]
    kept: list[Eagle3TargetBatch] = []
    with RemoteEagle3TargetModel.from_urls([batching_server.url], device="cpu", timeout=60, max_retries=0) as remote:
        remote.set_vocab_mapping(ids, mask)
        for group in range(GROUPS):
            batch_inputs = inputs[group * PER_GROUP : (group + 1) * PER_GROUP]
            handles = [remote.generate_batch_async(*b) for b in batch_inputs]
            kept += [h.result(timeout=60) for h in handles]
        assert remote.buffer_pool.stats.misses > 0  # the answers were received into the pool
    owners: dict[int, str] = {}
    shared = []
    for n, batch in enumerate(kept):
        for key in KEYS:
            ptr = getattr(batch, key).untyped_storage().data_ptr()
            if ptr in owners:
                shared.append(f"batch {n} {key} is on the memory of {owners[ptr]}")
            owners[ptr] = f"batch {n} {key}"
    assert shared == [], f"{len(shared)} tensors on another kept tensor's memory, first: {shared[:3]}"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 160 tiny forwards: threads only contend on a loaded machine (~10x slower)
    try:
        for n, (batch, batch_inputs) in enumerate(zip(kept, inputs, strict=True)):
            _close_to(batch, oracle.supervision(*batch_inputs, ids, mask), f"batch {n}")
    finally:
        torch.set_num_threads(threads)
