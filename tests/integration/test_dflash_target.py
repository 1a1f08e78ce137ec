"""Our remote DFlash target is upstream's ``HFDFlashTargetModel``, bit for bit.

The reference is upstream's own wrapper run in this process on the built-in model (float32 on
the CPU, as the appliances run it): for several layer sets, with and without the logits, on
padded batches and on packed rows made by upstream's packer, over the wire and over gloo,
synchronously and asynchronously, from one server and from a fleet of two; and the embeddings
and LM head the draft reuses.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from eagle3_appliance.launch import ServerProcess
from eagle3_client import RemoteDFlashTargetModel, protocol
from eagle3_client import dflash as dflash_module
from eagle3_client.synthetic import random_batch
from tests.integration.automodel_support import import_or_skip
from tests.integration.test_packing_compat import packed_batches

upstream = import_or_skip("nemo_automodel.components.speculative.dflash.target")
draft_qwen3 = import_or_skip("nemo_automodel.components.speculative.dflash.draft_qwen3")

VOCAB = 1024
LAYER_SETS = [
    [1, 3, 4],
    [0, 2, 4, 6, 7],  # the last layer too: its hook output precedes the final norm
    [7, 0],  # out of order
    [5],
    draft_qwen3.build_target_layer_ids(8, 5),  # what the recipe picks for a 5-layer draft
]


@pytest.fixture(scope="module")
def hf_model(model_dir: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).requires_grad_(False)


def assert_same_batch(got: object, want: object) -> None:
    assert type(got) is type(want) is upstream.DFlashTargetBatch
    for field in (
        "hidden_states",
        "input_ids",
        "attention_mask",
        "loss_mask",
        "logits",
        "position_ids",
        "seq_lens",
        "doc_remaining",
    ):
        a, b = getattr(got, field), getattr(want, field)
        if b is None:
            assert a is None, field
            continue
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), field


CASES = [
    *[(layers, logits, "wire") for layers in LAYER_SETS for logits in (False, True)],
    *[(LAYER_SETS[1], logits, "gloo") for logits in (False, True)],  # the group plane moves any answer
]


@pytest.mark.parametrize(("layers", "logits", "data_plane"), CASES, ids=str)
def test_bit_identical_to_hf_dflash_target(
    appliances: list[ServerProcess], hf_model: torch.nn.Module, layers: list[int], logits: bool, data_plane: str
) -> None:
    reference = upstream.HFDFlashTargetModel(hf_model, target_layer_ids=layers, capture_logits=logits)
    with RemoteDFlashTargetModel.from_urls(
        [appliances[0].url], target_layer_ids=layers, capture_logits=logits, data_plane=data_plane
    ) as remote:
        assert remote.target_layer_ids == reference.target_layer_ids
        for seed, (rows, length) in enumerate([(2, 24), (3, 17), (1, 1)]):
            inputs = random_batch(VOCAB, rows, length, seed=700 + seed, pad=rows > 1)
            assert_same_batch(remote.generate_batch(*inputs), reference.generate_batch(*inputs))
        assert remote.transport_stats()[0]["tier"] == data_plane


def test_async_requests_on_a_fleet_of_two_are_bit_identical(
    appliances: list[ServerProcess], hf_model: torch.nn.Module
) -> None:
    layers = [1, 4, 6]
    reference = upstream.HFDFlashTargetModel(hf_model, target_layer_ids=layers, capture_logits=True)
    batches = [random_batch(VOCAB, 2, 20 + i, seed=800 + i, pad=True) for i in range(6)]
    with RemoteDFlashTargetModel.from_urls(
        [p.url for p in appliances], target_layer_ids=layers, capture_logits=True
    ) as remote:
        handles = [remote.generate_batch_async(*inputs) for inputs in batches]
        for handle, inputs in zip(handles, batches, strict=True):
            assert_same_batch(handle.result(timeout=120), reference.generate_batch(*inputs))
        served = [stats["served"] for stats in remote.transport_stats()]
    assert sum(served) == len(batches)


def test_embeddings_and_lm_head_are_the_targets_fetched_in_bounded_chunks(
    appliances: list[ServerProcess], hf_model: torch.nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dflash_module, "LM_HEAD_CHUNK_BYTES", 100 * 64 * 4)  # 100 rows a request: 11 requests
    calls: list[int] = []
    with RemoteDFlashTargetModel.from_urls([appliances[0].url], target_layer_ids=[2]) as remote:
        server = remote._servers[0]
        post_wire = server.control.post_wire

        def counting(endpoint: str, content: bytes = b"", **kwargs: object) -> object:
            if endpoint == "lm_head_rows":
                calls.append(len(content))
            return post_wire(endpoint, content, **kwargs)  # type: ignore[arg-type]

        server.control.post_wire = counting  # type: ignore[method-assign]
        head = remote.get_output_embeddings()
        assert remote.get_output_embeddings() is head  # fetched once
        embed = remote.get_input_embeddings()
    want_head = hf_model.get_output_embeddings()
    assert len(calls) == 11 and max(calls) < 100 * 8 + 200
    assert head.weight.dtype == want_head.weight.dtype and torch.equal(head.weight, want_head.weight)
    assert head.bias is None and not head.weight.requires_grad
    assert torch.equal(embed.weight, hf_model.get_input_embeddings().weight)
    x = torch.randn(3, 64)
    assert torch.equal(head(x), want_head(x))


PACKED_CASES = [([1, 3, 4], False, "wire"), ([0, 2, 4, 6, 7], True, "wire"), ([7, 0], True, "gloo")]


@pytest.mark.parametrize(("layers", "logits", "data_plane"), PACKED_CASES, ids=str)
def test_packed_rows_are_bit_identical_to_hf_dflash_targets_packed_path(
    appliances: list[ServerProcess], hf_model: torch.nn.Module, layers: list[int], logits: bool, data_plane: str
) -> None:
    """Rows from upstream's packer, as the DFlash recipe builds them for ``packed_sequence_size``."""
    reference = upstream.HFDFlashTargetModel(hf_model, target_layer_ids=layers, capture_logits=logits)
    with RemoteDFlashTargetModel.from_urls(
        [appliances[0].url], target_layer_ids=layers, capture_logits=logits, data_plane=data_plane
    ) as remote:
        for seed, (size, rows, max_len) in enumerate([(24, 1, 8), (48, 3, 20), (64, 2, 64)]):
            for batch in packed_batches(size, rows, 900 + seed, max_len)[:2]:
                packing = {key: batch[key] for key in protocol.PACKING_KEYS}
                inputs = (batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
                want = reference.generate_batch(*inputs, **packing)
                assert_same_batch(remote.generate_batch(*inputs, **packing), want)
                assert_same_batch(remote.generate_batch_async(*inputs, **packing).result(timeout=120), want)
        assert remote.transport_stats()[0]["tier"] == data_plane


def test_a_packed_dflash_batch_differs_from_the_same_rows_unpacked(
    appliances: list[ServerProcess], hf_model: torch.nn.Module
) -> None:
    """The check above would be empty if packing changed nothing: documents really are kept apart."""
    batch = packed_batches(48, 2, 7, 16)[0]
    assert int((batch["seq_lens"] > 0).sum(1).min()) > 1  # every row holds several documents
    inputs = (batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
    with RemoteDFlashTargetModel.from_urls([appliances[0].url], target_layer_ids=[2, 5]) as remote:
        unpacked = remote.generate_batch(*inputs)
        packed = remote.generate_batch(*inputs, **{key: batch[key] for key in protocol.PACKING_KEYS})
    assert unpacked.seq_lens is None and packed.seq_lens is not None
    assert not torch.equal(unpacked.hidden_states, packed.hidden_states)
