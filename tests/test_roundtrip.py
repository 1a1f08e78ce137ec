"""Supervision over a real HTTP round-trip equals the independent in-process oracle, bit for bit."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import torch

from eagle3_appliance.core.inputs import GenerateInputs, VocabMapping
from eagle3_appliance.launch import ServerProcess
from eagle3_appliance.model.loading import load_target
from eagle3_appliance.model.supervision import in_process
from eagle3_appliance.settings import Settings
from eagle3_client import RemoteEagle3TargetModel, protocol, wire
from eagle3_client.contract import Eagle3TargetBatch
from eagle3_client.synthetic import random_batch, vocab_mapping
from tests.oracle import Oracle, assert_bit_exact

SHAPES = [(1, 1), (1, 7), (2, 33), (3, 64), (4, 128)]


@pytest.fixture(scope="module")
def remote(server: ServerProcess) -> RemoteEagle3TargetModel:
    model = RemoteEagle3TargetModel.from_urls([server.url], device="cpu", timeout=60, max_retries=0)
    yield model
    model.close()


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("batch", "seq"), SHAPES)
def test_generate_is_bit_exact_against_the_oracle(
    remote: RemoteEagle3TargetModel, oracle: Oracle, batch: int, seq: int, seed: int
) -> None:
    ids, mask = vocab_mapping(oracle.vocab_size, 100 + 37 * seed, seed=seed)
    remote.set_vocab_mapping(ids, mask)
    inputs = random_batch(oracle.vocab_size, batch, seq, seed=seed, pad=True)
    result = remote.generate_batch(*inputs)
    assert isinstance(result, Eagle3TargetBatch)
    assert_bit_exact(result, oracle.supervision(*inputs, ids, mask))
    assert torch.equal(result.attention_mask, inputs[1])
    assert result.logits is None


def test_padded_rows_really_are_padded(oracle: Oracle) -> None:
    _, attention_mask, _ = random_batch(oracle.vocab_size, 4, 64, seed=3, pad=True)
    assert (attention_mask == 0).any() and (attention_mask[0] == 1).all()


def test_int32_inputs_and_bool_masks_are_served_like_in_process(
    remote: RemoteEagle3TargetModel, oracle: Oracle
) -> None:
    ids, mask = vocab_mapping(oracle.vocab_size, 256, seed=5)
    remote.set_vocab_mapping(ids, mask)
    input_ids, attention_mask, loss_mask = random_batch(oracle.vocab_size, 2, 40, seed=5)
    inputs = (input_ids.int(), attention_mask.bool(), loss_mask.bool())
    result = remote.generate_batch(*inputs)
    expected = oracle.supervision(*inputs, ids, mask)
    assert result.input_ids.dtype == torch.int32 and result.loss_mask.dtype == torch.bool
    assert_bit_exact(result, expected)


def test_float_masks_are_accepted(remote: RemoteEagle3TargetModel, oracle: Oracle) -> None:
    ids, mask = vocab_mapping(oracle.vocab_size, 77, seed=6)
    remote.set_vocab_mapping(ids, mask)
    input_ids, attention_mask, loss_mask = random_batch(oracle.vocab_size, 2, 24, seed=6)
    inputs = (input_ids, attention_mask.float(), loss_mask.float())
    assert_bit_exact(remote.generate_batch(*inputs), oracle.supervision(*inputs, ids, mask))


def test_async_handles_return_results_in_submission_order(remote: RemoteEagle3TargetModel, oracle: Oracle) -> None:
    ids, mask = vocab_mapping(oracle.vocab_size, 300, seed=7)
    remote.set_vocab_mapping(ids, mask)
    batches = [random_batch(oracle.vocab_size, 2, 16 + 8 * i, seed=10 + i) for i in range(4)]
    handles = [remote.generate_batch_async(*b) for b in batches]
    for batch_inputs, handle in zip(batches, handles, strict=True):
        assert_bit_exact(handle.result(timeout=60), oracle.supervision(*batch_inputs, ids, mask))


def test_model_info_and_embeddings(remote: RemoteEagle3TargetModel, oracle: Oracle) -> None:
    info = remote.model_info()
    config = oracle.model.config
    assert info == {
        "num_hidden_layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "vocab_size": config.vocab_size,
        "aux_layer_ids": oracle.aux_layer_ids,
    }
    served = remote.served_model()  # our extension, for registered sessions only
    assert served is not None and (served.model, served.dtype, served.device) == ("builtin", "float32", "cpu")
    assert served.logits_size == config.vocab_size and served.max_seq_len == 512
    plain = httpx.post(remote.urls[0] + "/model_info", trust_env=False).json()
    assert plain == info  # an upstream client sees exactly upstream's keys
    embedding = remote.get_input_embeddings()
    assert torch.equal(embedding.weight, oracle.model.get_input_embeddings().weight)
    assert remote.get_input_embeddings() is embedding  # fetched once, cached
    assert remote.supports_async and remote.num_remote_servers == 1


def test_two_servers_round_robin_and_both_get_the_mapping(
    server: ServerProcess, cache_dir: Path, oracle: Oracle, tmp_path: Path
) -> None:
    with ServerProcess(["--cache-dir", str(cache_dir)], log_path=tmp_path / "second.log") as second:
        with RemoteEagle3TargetModel.from_urls([server.url, second.url], device="cpu", max_retries=0) as remote:
            ids, mask = vocab_mapping(oracle.vocab_size, 128, seed=11)
            remote.set_vocab_mapping(ids, mask)
            for i in range(4):  # alternates between the servers; each must have the mapping
                inputs = random_batch(oracle.vocab_size, 1, 20, seed=20 + i)
                assert_bit_exact(remote.generate_batch(*inputs), oracle.supervision(*inputs, ids, mask))
            assert remote.num_remote_servers == 2


def test_raw_upstream_style_requests_without_a_session(server: ServerProcess, oracle: Oracle) -> None:
    """What an upstream client sends: no session header, plain wire bodies, its own order of calls."""
    ids, mask = vocab_mapping(oracle.vocab_size, 64, seed=13)
    with httpx.Client(base_url=server.url, trust_env=False, timeout=60) as http:
        assert http.get("/health").json() == {"status": "ok"}
        reply = http.post("/init_nccl", json={"nccl_port": 9999})
        assert reply.status_code == 200 and reply.json()["status"] == "disabled"
        body = wire.encode({"selected_token_ids": ids, "selected_token_mask": mask})
        assert http.post("/set_vocab_mapping", content=body).json() == {"status": "ok"}
        inputs = random_batch(oracle.vocab_size, 2, 24, seed=13)
        answer = http.post(
            "/generate",
            content=wire.encode(dict(zip(protocol.GENERATE_INPUT_KEYS, inputs, strict=True))),
            headers={"Content-Type": protocol.OCTET_STREAM, protocol.NCCL_HEADER: "1"},
        )
        assert answer.status_code == 200
        assert protocol.NCCL_HEADER not in answer.headers  # no NCCL: the body is the wire blob
        tensors = wire.decode(answer.content)
        assert list(tensors) == list(protocol.SUPERVISION_KEYS)
        assert_bit_exact(tensors, oracle.supervision(*inputs, ids, mask))
        assert http.post("/heartbeat", content=b"anything").json() == {"status": "ok"}
        assert http.post("/disconnect", json={}).json() == {"status": "ok"}
        assert http.get("/health").status_code == 200  # a client leaving does not stop the server


def test_sessions_keep_their_own_vocab_mapping(server: ServerProcess, oracle: Oracle) -> None:
    with (
        RemoteEagle3TargetModel.from_urls([server.url], max_retries=0) as a,
        RemoteEagle3TargetModel.from_urls([server.url], max_retries=0) as b,
    ):
        ids_a, mask_a = vocab_mapping(oracle.vocab_size, 50, seed=30)
        ids_b, mask_b = vocab_mapping(oracle.vocab_size, 70, seed=31)
        a.set_vocab_mapping(ids_a, mask_a)
        b.set_vocab_mapping(ids_b, mask_b)
        inputs = random_batch(oracle.vocab_size, 1, 16, seed=32)
        assert_bit_exact(a.generate_batch(*inputs), oracle.supervision(*inputs, ids_a, mask_a))
        assert_bit_exact(b.generate_batch(*inputs), oracle.supervision(*inputs, ids_b, mask_b))


def test_in_process_target_matches_the_oracle(model_dir: Path, oracle: Oracle) -> None:
    """The appliance's own math, without HTTP, also equals the oracle (incl. T=1 and the zero tail)."""
    target = load_target(Settings(model=str(model_dir), device="cpu"))
    ids, mask = vocab_mapping(oracle.vocab_size, 200, seed=40)
    for batch, seq in SHAPES:
        inputs = random_batch(oracle.vocab_size, batch, seq, seed=batch * seq)
        got = in_process(target, GenerateInputs(*inputs), VocabMapping(ids, mask))
        assert_bit_exact(got, oracle.supervision(*inputs, ids, mask))
