"""The pooled projection and supervise path are bit-identical to the reference, and reuse is safe."""

from __future__ import annotations

import pytest
import torch

from eagle3_appliance.core.inputs import GenerateInputs, VocabMapping
from eagle3_appliance.dataplanes.buffers import ServerBuffers
from eagle3_appliance.model import supervision
from eagle3_appliance.model.loading import load_target
from eagle3_appliance.model.projection import project_into
from eagle3_appliance.model.supervision import in_process, reference_projection
from eagle3_appliance.model.target import Target
from eagle3_appliance.settings import Settings
from eagle3_client.encodings import PROBS
from eagle3_client.synthetic import random_batch, vocab_mapping
from eagle3_client.transports.buffers import BufferPool


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point():
        width = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        return torch.equal(a.contiguous().view(width), b.contiguous().view(width))
    return torch.equal(a, b)


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want)
    for key in want:
        assert _bits_equal(got[key], want[key]), key


def _inputs(batch: int, seq: int, vocab: int, dtype: torch.dtype, seed: int, ties: bool):
    g = torch.Generator().manual_seed(seed)
    if ties:  # few distinct values: many tied maxima, so argmax's first-index rule is exercised
        logits = torch.randint(-3, 4, (batch, seq, vocab), generator=g).to(dtype)
    else:
        logits = (torch.randn(batch, seq, vocab, generator=g) * 5).to(dtype)
    aux = torch.randn(batch, seq, 12, generator=g).to(dtype)
    input_ids = torch.randint(0, vocab, (batch, seq), generator=g)
    loss_mask = torch.randint(0, 2, (batch, seq), generator=g)
    return aux, logits, input_ids, loss_mask


@pytest.mark.parametrize(
    ("batch", "seq", "vocab", "draft", "dtype", "chunk_rows", "ties"),
    [
        (1, 37, 64, 16, torch.float32, None, False),
        (3, 37, 64, 16, torch.float32, 5, True),
        (2, 1, 64, 64, torch.float32, 1, False),  # one token: only the zero tail row
        (2, 2, 50, 1, torch.float32, 3, False),  # a one-token draft vocabulary
        (2, 33, 128, 40, torch.bfloat16, 7, False),  # the GPU dtype: gather, then widen, then softmax
        (2, 33, 128, 40, torch.bfloat16, None, True),
        (1, 300, 256, 256, torch.float16, 64, False),
    ],
)
def test_project_into_matches_compute_supervision_bit_for_bit(batch, seq, vocab, draft, dtype, chunk_rows, ties):
    aux, logits, input_ids, loss_mask = _inputs(batch, seq, vocab, dtype, seed=batch * seq + draft, ties=ties)
    mapping = VocabMapping(*vocab_mapping(vocab, draft, seed=seq))
    want = reference_projection(aux, logits, input_ids, loss_mask, mapping)
    pool = BufferPool()
    for _ in range(2):  # the second run writes into reused blocks
        got = project_into(aux, logits, input_ids, loss_mask, mapping, alloc=pool.empty, chunk_rows=chunk_rows)
        _assert_same(got, want)
        del got
    assert pool.stats.hits > 0


def test_project_into_without_pool_allocates_fresh_and_matches():
    aux, logits, input_ids, loss_mask = _inputs(2, 20, 32, torch.float32, seed=3, ties=False)
    mapping = VocabMapping(*vocab_mapping(32, 10))
    _assert_same(
        project_into(aux, logits, input_ids, loss_mask, mapping),
        reference_projection(aux, logits, input_ids, loss_mask, mapping),
    )


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Target:
    return load_target(Settings(cache_dir=tmp_path_factory.mktemp("model-cache")))


def _served(target: Target, buffers: ServerBuffers, inputs: tuple, mapping: VocabMapping) -> dict[str, torch.Tensor]:
    """What the server's pipeline computes for a wire answer: forward and projection into pooled memory."""
    alloc = buffers.device_alloc()
    batch = GenerateInputs(*inputs)
    out = target.forward(batch.input_ids, batch.attention_mask, alloc=alloc)
    return buffers.to_host(supervision.encode(PROBS, out, batch, mapping, alloc=alloc))


def test_served_path_matches_the_reference_and_never_overwrites_a_held_answer(target: Target):
    mapping = VocabMapping(*vocab_mapping(target.logits_size, 300))
    buffers = ServerBuffers(target.device, 1 << 30)
    first_inputs = random_batch(target.vocab_size, 2, 64, seed=1)
    second_inputs = random_batch(target.vocab_size, 2, 64, seed=2)
    want_first = in_process(target, GenerateInputs(*first_inputs), mapping)
    want_second = in_process(target, GenerateInputs(*second_inputs), mapping)

    first = _served(target, buffers, first_inputs, mapping)
    _assert_same(first, want_first)
    second = _served(target, buffers, second_inputs, mapping)  # `first` is still held
    _assert_same(second, want_second)
    _assert_same(first, want_first)  # untouched by the second request
    assert first["target_probs"].data_ptr() != second["target_probs"].data_ptr()

    del first, second
    hits = buffers.host.stats.hits
    third = _served(target, buffers, first_inputs, mapping)
    _assert_same(third, want_first)
    assert buffers.host.stats.hits > hits  # blocks of dropped answers are reused
