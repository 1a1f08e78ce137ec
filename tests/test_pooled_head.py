"""The LM head writing into pooled memory computes the head's own bits, and leaves the head as it was."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from eagle3_appliance.core.inputs import GenerateInputs
from eagle3_appliance.model.loading import load_target
from eagle3_appliance.model.pooled_head import pooled_head_supported, pooled_logits
from eagle3_appliance.model.target import Target
from eagle3_appliance.settings import Settings
from eagle3_client.synthetic import random_batch
from eagle3_client.transports.buffers import BufferPool


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({2: torch.int16, 4: torch.int32}[t.element_size()])


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Target:
    return load_target(Settings(cache_dir=tmp_path_factory.mktemp("model-cache")))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_pooled_logits_are_the_heads_own_bits_in_reused_memory(target: Target, dtype: torch.dtype):
    target.model.to(dtype)
    try:
        inputs = GenerateInputs(*random_batch(target.vocab_size, 2, 77, seed=5))
        want = target.forward(inputs.input_ids, inputs.attention_mask)
        pool = BufferPool()
        first = target.forward(inputs.input_ids, inputs.attention_mask, alloc=pool.empty)
        assert first.logits.dtype == dtype and torch.equal(_bits(first.logits), _bits(want.logits))
        assert torch.equal(_bits(first.aux_hidden_states), _bits(want.aux_hidden_states))
        first_ptr = first.logits.data_ptr()
        del first
        hits = pool.stats.hits
        second = target.forward(inputs.input_ids, inputs.attention_mask, alloc=pool.empty)
        assert torch.equal(_bits(second.logits), _bits(want.logits))
        assert second.logits.data_ptr() == first_ptr  # the dropped answer's block, written again
        assert pool.stats.hits >= hits + 2  # aux states and logits both came from the pool
        assert "forward" not in target.lm_head.__dict__  # the class's forward is back
    finally:
        target.model.to(torch.float32)


def test_a_head_with_a_bias_or_a_subclass_keeps_its_own_forward():
    class Scaled(nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) * 2

    x = torch.randn(2, 5, 8)
    pool = BufferPool()
    for head in (nn.Linear(8, 16, bias=True), Scaled(8, 16, bias=False)):
        assert not pooled_head_supported(head)
        with torch.no_grad(), pooled_logits(head, pool.empty):
            got = head(x)
        assert torch.equal(got, head(x).detach())
    assert pool.stats.misses == 0  # nothing was taken from the pool


def test_a_patched_forward_is_left_alone():
    head = nn.Linear(8, 16, bias=False)

    def own(x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(x.shape[:-1] + (16,))

    head.forward = own  # type: ignore[method-assign]
    assert not pooled_head_supported(head)
    with torch.no_grad(), pooled_logits(head, BufferPool().empty):
        got = head(torch.ones(1, 3, 8))
    assert head.forward is own and torch.equal(got, torch.zeros(1, 3, 16))
