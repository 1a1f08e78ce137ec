"""Our remote EAGLE-1/2 target is upstream's ``HFEagleTargetModel``, bit for bit.

The reference is upstream's own wrapper run in this process (float32 on the CPU, as the
appliances run it): on the built-in model with padded batches and with packed rows made by
upstream's packer, over the wire and over gloo, synchronously and asynchronously, from one server
and from a fleet of two; on the tiny Qwen2-VL of ``tests/vlm_support.py`` with text-only batches,
as ViSpec's stage 1 uses it; and the embeddings and LM head the recipes read. Upstream computes
``lm_head(base_model(...)[0])`` on its own; the server's logits are its forward's, so these checks
are what says the two are the same bits.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from eagle3_appliance.launch import ServerProcess
from eagle3_client import RemoteEagleTargetModel, protocol
from eagle3_client.synthetic import random_batch
from tests.integration.automodel_support import import_or_skip
from tests.integration.test_packing_compat import packed_batches
from tests.vlm_support import APPLIANCE_ARGS, make_tiny_vlm

upstream = import_or_skip("nemo_automodel.components.speculative.eagle.target_v12")

VOCAB = 1024
FIELDS = (
    "input_hidden_states",
    "target_hidden_states",
    "target_logits",
    "input_ids",
    "attention_mask",
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
    assert type(got) is type(want) is upstream.EagleTargetBatch
    for field in FIELDS:
        a, b = getattr(got, field), getattr(want, field)
        if b is None:
            assert a is None, field
            continue
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), field


@pytest.mark.parametrize("data_plane", ["wire", "gloo"])
def test_bit_identical_to_hf_eagle_target(
    appliances: list[ServerProcess], hf_model: torch.nn.Module, data_plane: str
) -> None:
    reference = upstream.HFEagleTargetModel(hf_model)
    with RemoteEagleTargetModel.from_urls([appliances[0].url], data_plane=data_plane) as remote:
        for seed, (rows, length) in enumerate([(2, 24), (3, 17), (1, 1), (2, 70)]):
            inputs = random_batch(VOCAB, rows, length, seed=1700 + seed, pad=rows > 1)
            want = reference.generate_batch(*inputs)
            assert_same_batch(remote.generate_batch(*inputs), want)
            assert want.target_logits.shape == (rows, length, VOCAB)
        assert remote.transport_stats()[0]["tier"] == data_plane


def test_async_requests_on_a_fleet_of_two_are_bit_identical(
    appliances: list[ServerProcess], hf_model: torch.nn.Module
) -> None:
    reference = upstream.HFEagleTargetModel(hf_model)
    batches = [random_batch(VOCAB, 2, 20 + i, seed=1800 + i, pad=True) for i in range(6)]
    with RemoteEagleTargetModel.from_urls([p.url for p in appliances]) as remote:
        handles = [remote.generate_batch_async(*inputs) for inputs in batches]
        for handle, inputs in zip(handles, batches, strict=True):
            assert_same_batch(handle.result(timeout=120), reference.generate_batch(*inputs))
        served = [stats["served"] for stats in remote.transport_stats()]
    assert sum(served) == len(batches)


def test_embeddings_and_lm_head_are_the_targets(appliances: list[ServerProcess], hf_model: torch.nn.Module) -> None:
    reference = upstream.HFEagleTargetModel(hf_model)
    with RemoteEagleTargetModel.from_urls([appliances[0].url]) as remote:
        head = remote.get_lm_head()
        assert remote.get_lm_head() is head  # fetched once
        embed = remote.get_input_embeddings()
    want_head, want_embed = reference.get_lm_head(), reference.get_input_embeddings()
    assert head.weight.dtype == want_head.weight.dtype and torch.equal(head.weight, want_head.weight)
    assert head.bias is None and not head.weight.requires_grad
    assert torch.equal(embed.weight, want_embed.weight)


@pytest.mark.parametrize("data_plane", ["wire", "gloo"])
def test_packed_rows_are_bit_identical_to_hf_eagle_targets_packed_path(
    appliances: list[ServerProcess], hf_model: torch.nn.Module, data_plane: str
) -> None:
    """Rows from upstream's packer, as the EAGLE-1/2 recipe builds them for ``packed_sequence_size``."""
    reference = upstream.HFEagleTargetModel(hf_model)
    with RemoteEagleTargetModel.from_urls([appliances[0].url], data_plane=data_plane) as remote:
        for seed, (size, rows, max_len) in enumerate([(24, 1, 8), (48, 3, 20), (64, 2, 64)]):
            for batch in packed_batches(size, rows, 1900 + seed, max_len)[:2]:
                packing = {key: batch[key] for key in protocol.PACKING_KEYS}
                inputs = (batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
                want = reference.generate_batch(*inputs, **packing)
                assert_same_batch(remote.generate_batch(*inputs, **packing), want)
                assert_same_batch(remote.generate_batch_async(*inputs, **packing).result(timeout=120), want)
        assert remote.transport_stats()[0]["tier"] == data_plane


def test_a_packed_eagle_batch_differs_from_the_same_rows_unpacked(appliances: list[ServerProcess]) -> None:
    """The check above would be empty if packing changed nothing: documents really are kept apart."""
    batch = packed_batches(48, 2, 7, 16)[0]
    assert int((batch["seq_lens"] > 0).sum(1).min()) > 1  # every row holds several documents
    inputs = (batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
    with RemoteEagleTargetModel.from_urls([appliances[0].url]) as remote:
        unpacked = remote.generate_batch(*inputs)
        packed = remote.generate_batch(*inputs, **{key: batch[key] for key in protocol.PACKING_KEYS})
    assert unpacked.seq_lens is None and packed.seq_lens is not None
    assert not torch.equal(unpacked.input_hidden_states, packed.input_hidden_states)
    assert not torch.equal(unpacked.target_logits, packed.target_logits)


# -- ViSpec stage 1: a vision-language target, text-only batches ------------------------------


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_vlm(tmp_path_factory.mktemp("vlm") / "model")


@pytest.fixture(scope="module")
def vlm_server(vlm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("vlm-logs") / "server.log"
    with ServerProcess(["--model", str(vlm_dir), *APPLIANCE_ARGS], log_path=log) as proc:
        yield proc


@pytest.mark.parametrize("data_plane", ["wire", "gloo"])
def test_a_vision_language_target_with_text_only_batches_is_bit_identical(
    vlm_server: ServerProcess, vlm_dir: Path, data_plane: str
) -> None:
    from transformers import AutoModelForImageTextToText

    from tests.vlm_support import IMAGE_TOKEN

    model = AutoModelForImageTextToText.from_pretrained(vlm_dir, dtype=torch.float32).requires_grad_(False)
    reference = upstream.HFEagleTargetModel(model)
    with RemoteEagleTargetModel.from_urls([vlm_server.url], data_plane=data_plane) as remote:
        for seed, (rows, length) in enumerate([(2, 16), (3, 12), (1, 9), (2, 40)]):
            inputs = random_batch(IMAGE_TOKEN, rows, length, seed=2000 + seed, pad=rows > 1)  # no image tokens
            assert_same_batch(remote.generate_batch(*inputs), reference.generate_batch(*inputs))
        assert torch.equal(remote.get_lm_head().weight, reference.get_lm_head().weight)
        assert torch.equal(remote.get_input_embeddings().weight, reference.get_input_embeddings().weight)
        assert remote.transport_stats()[0]["tier"] == data_plane
