"""Our remote DSpark target is upstream's ``HFDSparkTargetModel``, bit for bit.

The reference is upstream's own wrapper run in this process on the built-in model (float32 on
the CPU, as the appliances run it): for several layer sets (with ``-1``, the embedding output,
and the last layer, the post-norm hidden state), on padded batches and on packed rows made by
upstream's packer, over the wire and over gloo, synchronously and asynchronously, from one
server and from a fleet of two; and the embeddings and LM head the recipe reads.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from eagle3_appliance.launch import ServerProcess
from eagle3_client import RemoteDSparkTargetModel, protocol
from eagle3_client.synthetic import random_batch
from tests.integration.automodel_support import import_or_skip
from tests.integration.test_packing_compat import packed_batches

upstream = import_or_skip("nemo_automodel.components.speculative.dspark.target")

VOCAB = 1024
LAYER_SETS = [
    [-1, 3, 7],  # the embedding output and the last layer (post-norm)
    [0, 2, 4, 6],
    [-1],
    [7],
    [1, 5, 6, 7],
]
FIELDS = (
    "target_hidden_states",
    "target_last_hidden_states",
    "input_ids",
    "loss_mask",
    "position_ids",
    "seq_lens",
    "doc_remaining",
)


@pytest.fixture(scope="module")
def hf_model(model_dir: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).requires_grad_(False)


def assert_same_batch(got: object, want: object) -> None:
    assert type(got) is type(want) is upstream.DSparkTargetBatch
    for field in FIELDS:
        a, b = getattr(got, field), getattr(want, field)
        if b is None:
            assert a is None, field
            continue
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), field


CASES = [
    *[(layers, "wire") for layers in LAYER_SETS],
    *[(layers, "gloo") for layers in LAYER_SETS[:2]],  # the group plane moves any answer
]


@pytest.mark.parametrize(("layers", "data_plane"), CASES, ids=str)
def test_bit_identical_to_hf_dspark_target(
    appliances: list[ServerProcess], hf_model: torch.nn.Module, layers: list[int], data_plane: str
) -> None:
    reference = upstream.HFDSparkTargetModel(hf_model, target_layer_ids=layers)
    with RemoteDSparkTargetModel.from_urls(
        [appliances[0].url], target_layer_ids=layers, data_plane=data_plane
    ) as remote:
        assert remote.target_layer_ids == reference.target_layer_ids
        for seed, (rows, length) in enumerate([(2, 24), (3, 17), (1, 1)]):
            inputs = random_batch(VOCAB, rows, length, seed=700 + seed, pad=rows > 1)
            assert_same_batch(remote.generate_batch(*inputs), reference.generate_batch(*inputs))
        assert remote.transport_stats()[0]["tier"] == data_plane


def test_async_requests_on_a_fleet_of_two_are_bit_identical(
    appliances: list[ServerProcess], hf_model: torch.nn.Module
) -> None:
    layers = [-1, 4, 7]
    reference = upstream.HFDSparkTargetModel(hf_model, target_layer_ids=layers)
    batches = [random_batch(VOCAB, 2, 20 + i, seed=800 + i, pad=True) for i in range(6)]
    with RemoteDSparkTargetModel.from_urls([p.url for p in appliances], target_layer_ids=layers) as remote:
        handles = [remote.generate_batch_async(*inputs) for inputs in batches]
        for handle, inputs in zip(handles, batches, strict=True):
            assert_same_batch(handle.result(timeout=120), reference.generate_batch(*inputs))
        served = [stats["served"] for stats in remote.transport_stats()]
    assert sum(served) == len(batches)


def test_embeddings_and_lm_head_are_the_targets(appliances: list[ServerProcess], hf_model: torch.nn.Module) -> None:
    reference = upstream.HFDSparkTargetModel(hf_model, target_layer_ids=[2])
    with RemoteDSparkTargetModel.from_urls([appliances[0].url], target_layer_ids=[2]) as remote:
        head = remote.get_output_embeddings()
        assert remote.get_output_embeddings() is head  # fetched once
        embed = remote.get_input_embeddings()
    want_head, want_embed = reference.get_output_embeddings(), reference.get_input_embeddings()
    assert head.weight.dtype == want_head.weight.dtype and torch.equal(head.weight, want_head.weight)
    assert head.bias is None and not head.weight.requires_grad
    assert torch.equal(embed.weight, want_embed.weight)


PACKED_CASES = [([-1, 3, 7], "wire"), ([0, 2, 4, 6], "wire"), ([-1, 5, 7], "gloo")]


@pytest.mark.parametrize(("layers", "data_plane"), PACKED_CASES, ids=str)
def test_packed_rows_are_bit_identical_to_hf_dspark_targets_packed_path(
    appliances: list[ServerProcess], hf_model: torch.nn.Module, layers: list[int], data_plane: str
) -> None:
    """Rows from upstream's packer, as the DSpark recipe builds them for ``packed_sequence_size``."""
    reference = upstream.HFDSparkTargetModel(hf_model, target_layer_ids=layers)
    with RemoteDSparkTargetModel.from_urls(
        [appliances[0].url], target_layer_ids=layers, data_plane=data_plane
    ) as remote:
        for seed, (size, rows, max_len) in enumerate([(24, 1, 8), (48, 3, 20), (64, 2, 64)]):
            for batch in packed_batches(size, rows, 900 + seed, max_len)[:2]:
                packing = {key: batch[key] for key in protocol.PACKING_KEYS}
                inputs = (batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
                want = reference.generate_batch(*inputs, **packing)
                assert_same_batch(remote.generate_batch(*inputs, **packing), want)
                assert_same_batch(remote.generate_batch_async(*inputs, **packing).result(timeout=120), want)
        assert remote.transport_stats()[0]["tier"] == data_plane


def test_a_packed_dspark_batch_differs_from_the_same_rows_unpacked(
    appliances: list[ServerProcess], hf_model: torch.nn.Module
) -> None:
    """The check above would be empty if packing changed nothing: documents really are kept apart."""
    batch = packed_batches(48, 2, 7, 16)[0]
    assert int((batch["seq_lens"] > 0).sum(1).min()) > 1  # every row holds several documents
    inputs = (batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
    with RemoteDSparkTargetModel.from_urls([appliances[0].url], target_layer_ids=[2, 5]) as remote:
        unpacked = remote.generate_batch(*inputs)
        packed = remote.generate_batch(*inputs, **{key: batch[key] for key in protocol.PACKING_KEYS})
    assert unpacked.seq_lens is None and packed.seq_lens is not None
    assert not torch.equal(unpacked.target_hidden_states, packed.target_hidden_states)
    assert not torch.equal(unpacked.target_last_hidden_states, packed.target_last_hidden_states)
