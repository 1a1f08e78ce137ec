"""Supervision encodings over real HTTP round-trips: exact where promised, bounded where not.

Every answer is checked against the independent oracle (``tests/oracle.py``) or, for the
bf16 and Gemma-2 servers, against the appliance's own in-process reference.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from eagle3_appliance.core.inputs import GenerateInputs, VocabMapping
from eagle3_appliance.launch import ServerProcess
from eagle3_appliance.model.loading import load_target
from eagle3_appliance.model.supervision import HIDDEN_TOLERANCE, in_process
from eagle3_appliance.model.target import Target
from eagle3_appliance.settings import Device, Dtype, Settings
from eagle3_client import RemoteEagle3TargetModel, protocol, wire
from eagle3_client.encodings import response_bytes, wire_bytes_per_token
from eagle3_client.synthetic import random_batch, vocab_mapping
from tests.oracle import Oracle, assert_bit_exact

DRAFT = 512
K = 16
SHAPES = [(1, 1), (2, 33), (3, 64)]


@pytest.fixture(scope="module")
def mapping(oracle: Oracle) -> tuple[torch.Tensor, torch.Tensor]:
    return vocab_mapping(oracle.vocab_size, DRAFT, seed=7)


def connect(url: str, encoding: str | None, mapping: tuple[torch.Tensor, torch.Tensor]) -> RemoteEagle3TargetModel:
    remote = RemoteEagle3TargetModel.from_urls([url], device="cpu", timeout=60, max_retries=0, encoding=encoding)
    remote.set_vocab_mapping(*mapping)
    return remote


def without_probs(expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in expected.items() if k != "target_probs"}


def generate_raw(http: httpx.Client, session: str | None, inputs: tuple[torch.Tensor, ...]) -> httpx.Response:
    headers = {"Content-Type": protocol.OCTET_STREAM}
    if session:
        headers[protocol.SESSION_HEADER] = session
    body = wire.encode(dict(zip(protocol.GENERATE_INPUT_KEYS, inputs, strict=True)))
    return http.post("/" + protocol.EP_GENERATE, content=body, headers=headers)


def open_session(http: httpx.Client, offer: dict, mapping: tuple[torch.Tensor, torch.Tensor]) -> str:
    reply = http.post("/session", json=offer)
    assert reply.status_code == 200, reply.text
    session = reply.json()["session_id"]
    body = wire.encode(dict(zip(protocol.VOCAB_MAPPING_KEYS, mapping, strict=True)))
    answer = http.post("/set_vocab_mapping", content=body, headers={protocol.SESSION_HEADER: session})
    assert answer.status_code == 200, answer.text
    return session


# -- lossless encodings ---------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["probs", "logits"])
def test_probs_and_logits_are_bit_exact_sync_and_async(
    server: ServerProcess, oracle: Oracle, mapping: tuple[torch.Tensor, torch.Tensor], encoding: str
) -> None:
    with connect(server.url, encoding, mapping) as remote:
        assert remote.encoding_stats()["negotiated"] == {server.url: encoding}
        for seed, (batch, seq) in enumerate(SHAPES):
            inputs = random_batch(oracle.vocab_size, batch, seq, seed=seed)
            assert_bit_exact(remote.generate_batch(*inputs), oracle.supervision(*inputs, *mapping))
        handles = [remote.generate_batch_async(*random_batch(oracle.vocab_size, 2, 20, seed=s)) for s in (10, 11)]
        for seed, handle in zip((10, 11), handles, strict=True):
            inputs = random_batch(oracle.vocab_size, 2, 20, seed=seed)
            assert_bit_exact(handle.result(timeout=60), oracle.supervision(*inputs, *mapping))
        assert remote.encoding_stats()["batches"] == {encoding: len(SHAPES) + 2}


def test_hidden_is_within_tolerance_and_its_position_mask_is_identical(
    server: ServerProcess, oracle: Oracle, mapping: tuple[torch.Tensor, torch.Tensor]
) -> None:
    with connect(server.url, "hidden", mapping) as remote:
        assert remote.encoding_stats()["negotiated"] == {server.url: "hidden"}
        worst = 0.0
        for seed, (batch, seq) in enumerate(SHAPES):
            inputs = random_batch(oracle.vocab_size, batch, seq, seed=20 + seed)
            got = remote.generate_batch(*inputs)
            expected = oracle.supervision(*inputs, *mapping)
            assert_bit_exact(got, without_probs(expected))  # position_mask, aux, ids, loss mask
            assert got.target_probs.dtype == torch.float32 and got.target_probs.shape == expected["target_probs"].shape
            worst = max(worst, float((got.target_probs - expected["target_probs"]).abs().max()))
        print(f"hidden: largest |target_probs - reference| on the built-in model (float32, CPU) = {worst:.3g}")
        assert worst <= HIDDEN_TOLERANCE


def test_hidden_follows_a_new_vocab_mapping(server: ServerProcess, oracle: Oracle) -> None:
    """The client's LM-head rows belong to one mapping: a new mapping must refetch them."""
    first = vocab_mapping(oracle.vocab_size, 300, seed=40)
    second = vocab_mapping(oracle.vocab_size, 200, seed=41)
    inputs = random_batch(oracle.vocab_size, 2, 24, seed=42)
    with connect(server.url, "hidden", first) as remote:
        for mapping in (first, second, first):
            remote.set_vocab_mapping(*mapping)
            got = remote.generate_batch(*inputs)
            expected = oracle.supervision(*inputs, *mapping)
            assert got.target_probs.shape == expected["target_probs"].shape
            assert float((got.target_probs - expected["target_probs"]).abs().max()) <= HIDDEN_TOLERANCE


def test_lm_head_rows_are_the_models_rows(server: ServerProcess, oracle: Oracle) -> None:
    ids = torch.tensor([5, 0, 1023, 17])
    with httpx.Client(base_url=server.url, trust_env=False, timeout=60) as http:
        answer = http.post("/lm_head_rows", content=wire.encode({"selected_token_ids": ids}))
        assert answer.status_code == 200
        assert torch.equal(wire.decode(answer.content)["weight"], oracle.model.lm_head.weight[ids])
        for body, message in [
            ({"selected_token_ids": torch.tensor([1024])}, "must lie in [0, 1024)"),
            ({"ids": ids}, "expected exactly the key 'selected_token_ids'"),
            ({"selected_token_ids": torch.zeros(2, 2, dtype=torch.long)}, "non-empty 1-D integer"),
        ]:
            bad = http.post("/lm_head_rows", content=wire.encode(body))
            assert (bad.status_code, message in bad.json()["error"]) == (422, True), bad.text


# -- the lossy encoding ---------------------------------------------------------------------


def test_topk_rows_sum_to_one_and_keep_exactly_the_top_k(
    server: ServerProcess, oracle: Oracle, mapping: tuple[torch.Tensor, torch.Tensor]
) -> None:
    with connect(server.url, f"topk:{K}", mapping) as remote:
        inputs = random_batch(oracle.vocab_size, 3, 64, seed=50)
        got = remote.generate_batch(*inputs)
        expected = oracle.supervision(*inputs, *mapping)
        assert_bit_exact(got, without_probs(expected))
        probs, reference = got.target_probs, expected["target_probs"]
        assert probs.dtype == torch.float32 and probs.shape == reference.shape
        assert float((probs.sum(-1) - 1).abs().max()) <= 1e-6
        values, indices = reference.topk(K, dim=-1)
        kept = torch.zeros_like(reference, dtype=torch.bool).scatter_(-1, indices, True)
        assert torch.equal(probs > 0, kept)  # exactly the K largest, nothing else
        assert torch.equal(probs, torch.zeros_like(reference).scatter_(-1, indices, values / values.sum(-1, True)))
        stats = remote.encoding_stats()
        mass = values.sum(-1)[expected["position_mask"].squeeze(-1)]
        assert stats["topk_kept_mass_mean"] == pytest.approx(float(mass.mean()), rel=1e-5)
        assert stats["topk_kept_mass_min"] == pytest.approx(float(mass.min()), rel=1e-6)
        assert stats["topk_supervised_positions"] == mass.numel()
        print(f"topk:{K} of D={DRAFT}: kept mass mean {stats['topk_kept_mass_mean']:.3f} min {mass.min():.3f}")


def test_topk_larger_than_the_draft_vocabulary_is_refused(server: ServerProcess, oracle: Oracle) -> None:
    mapping = vocab_mapping(oracle.vocab_size, 100, seed=60)
    with httpx.Client(base_url=server.url, trust_env=False, timeout=60) as http:
        session = http.post("/session", json={"encoding": "topk:101"}).json()["session_id"]
        body = wire.encode(dict(zip(protocol.VOCAB_MAPPING_KEYS, mapping, strict=True)))
        answer = http.post("/set_vocab_mapping", content=body, headers={protocol.SESSION_HEADER: session})
        assert answer.status_code == 422 and "use K <= D" in answer.json()["error"]
    remote = RemoteEagle3TargetModel.from_urls([server.url], encoding="topk:101")
    with pytest.raises(ValueError, match="K <= the draft vocabulary size 100"):
        remote.set_vocab_mapping(*mapping)
    remote.close()


# -- negotiation and bytes on the wire ----------------------------------------------------------


@pytest.mark.parametrize(
    ("offer", "message"),
    [
        ({"encoding": "zip"}, "unknown supervision encoding 'zip'"),
        ({"encoding": "topk"}, "needs a size"),
        ({"encoding": "topk:0"}, "K >= 1"),
        ({"encoding": "topk:many"}, "integer K"),
        ({"encoding": 3}, "must be a string"),
        ({"encoding": "logits", "encodings": "probs"}, "must be a list"),
        ({"encoding": "logits", "encodings": ["probs", "nope"]}, "unknown supervision encoding 'nope'"),
    ],
)
def test_invalid_offers_are_422_with_a_reason(server: ServerProcess, offer: dict, message: str) -> None:
    answer = httpx.post(server.url + "/session", json=offer, trust_env=False)
    assert answer.status_code == 422 and message in answer.json()["error"], answer.text


@pytest.mark.parametrize("encoding", ["probs", "logits", "hidden", f"topk:{K}"])
def test_measured_bytes_per_token_match_the_calculator(
    server: ServerProcess, oracle: Oracle, mapping: tuple[torch.Tensor, torch.Tensor], encoding: str
) -> None:
    hidden_size = oracle.model.config.hidden_size
    dims = {"hidden_size": hidden_size, "draft_vocab": DRAFT, "dtype_bytes": 4}  # float32 on CPU
    with httpx.Client(base_url=server.url, trust_env=False, timeout=60) as http:
        session = open_session(http, {"encoding": encoding}, mapping)
        lengths = {}
        for batch, seq in [(1, 10), (2, 50)]:
            answer = generate_raw(http, session, random_batch(oracle.vocab_size, batch, seq, seed=70))
            assert answer.status_code == 200
            assert answer.headers.get(protocol.ENCODING_HEADER) == (None if encoding == "probs" else encoding)
            length = int(answer.headers["content-length"])
            assert len(answer.content) == length
            assert length == response_bytes(encoding, batch=batch, seq_len=seq, **dims)
            lengths[batch * seq] = length
            keys = list(wire.decode(answer.content))
            assert keys == list(protocol.ENCODING_KEYS[encoding.split(":")[0]])
    per_token = (lengths[100] - lengths[10]) / 90
    print(f"{encoding}: {per_token:.0f} bytes/token measured on the built-in model (H={hidden_size}, D={DRAFT})")
    assert per_token == wire_bytes_per_token(encoding, **dims)


def test_upstream_clients_still_get_probs_without_an_encoding_header(
    server: ServerProcess, oracle: Oracle, mapping: tuple[torch.Tensor, torch.Tensor]
) -> None:
    """No session header (an upstream client) or an offer without "encoding": probs, no header."""
    inputs = random_batch(oracle.vocab_size, 2, 16, seed=80)
    expected = oracle.supervision(*inputs, *mapping)
    with connect(server.url, "logits", mapping) as other, httpx.Client(base_url=server.url, trust_env=False) as http:
        other.generate_batch(*inputs)  # a non-default session is live on the same server
        body = wire.encode(dict(zip(protocol.VOCAB_MAPPING_KEYS, mapping, strict=True)))
        assert http.post("/set_vocab_mapping", content=body).status_code == 200
        plain_session = open_session(http, {"client": "older-client"}, mapping)
        assert http.post("/session", json={}).json()["encoding"] == "probs"
        for session in (None, plain_session):
            answer = generate_raw(http, session, inputs)
            assert protocol.ENCODING_HEADER not in answer.headers
            tensors = wire.decode(answer.content)
            assert list(tensors) == list(protocol.SUPERVISION_KEYS)
            assert_bit_exact(tensors, expected)


# -- other dtypes and models ------------------------------------------------------------------


@pytest.fixture(scope="module")
def bf16_server(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("logs") / "bf16.log"
    args = ["--cache-dir", str(cache_dir), "--dtype", "bfloat16", "--device", "cpu", "--max-seq-len", "256"]
    with ServerProcess(args, log_path=log) as proc:
        yield proc


def test_bf16_logits_are_bit_exact_and_half_the_bytes(
    bf16_server: ServerProcess, model_dir: Path, mapping: tuple[torch.Tensor, torch.Tensor]
) -> None:
    reference = load_target(Settings(model=str(model_dir), dtype=Dtype.bfloat16, device=Device.cpu))
    inputs = random_batch(reference.vocab_size, 2, 40, seed=90)
    expected = in_process(reference, GenerateInputs(*inputs), VocabMapping(*mapping))
    with connect(bf16_server.url, "logits", mapping) as remote:
        assert_bit_exact(remote.generate_batch(*inputs), expected)
    with connect(bf16_server.url, "hidden", mapping) as remote:
        got = remote.generate_batch(*inputs)
        assert_bit_exact(got, without_probs(expected))
        deviation = float((got.target_probs - expected["target_probs"]).abs().max())
        print(f"hidden, bfloat16 model on CPU: largest deviation {deviation:.3g}")
        assert deviation <= HIDDEN_TOLERANCE
    dims = {"hidden_size": reference.hidden_size, "draft_vocab": DRAFT, "dtype_bytes": 2}
    assert wire_bytes_per_token("logits", **dims) - 3 * reference.hidden_size * 2 - 17 == 2 * DRAFT
    with httpx.Client(base_url=bf16_server.url, trust_env=False, timeout=60) as http:
        session = open_session(http, {"encoding": "logits"}, mapping)
        answer = generate_raw(http, session, inputs)
        assert int(answer.headers["content-length"]) == response_bytes("logits", batch=2, seq_len=40, **dims)


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Gemma-2: its final logit soft-capping makes "hidden" impossible."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    path = tmp_path_factory.mktemp("gemma2")
    config = Gemma2Config(
        hidden_size=32, intermediate_size=64, num_hidden_layers=8, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, vocab_size=256, final_logit_softcapping=30.0,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        Gemma2ForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def gemma(gemma_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, Target]]:
    log = tmp_path_factory.mktemp("logs") / "gemma.log"
    with ServerProcess(["--model", str(gemma_dir), "--device", "cpu"], log_path=log) as proc:
        yield proc, load_target(Settings(model=str(gemma_dir), device=Device.cpu))


def test_hidden_is_refused_for_a_soft_capped_model(
    gemma: tuple[ServerProcess, Target], caplog: pytest.LogCaptureFixture
) -> None:
    server, reference = gemma
    mapping = vocab_mapping(reference.logits_size, 100, seed=95)
    with httpx.Client(base_url=server.url, trust_env=False, timeout=60) as http:
        only_hidden = http.post("/session", json={"encoding": "hidden"})
        assert only_hidden.status_code == 422 and "final_logit_softcapping=30.0" in only_hidden.json()["error"]
        reply = http.post("/session", json={"encoding": "hidden", "encodings": ["probs"]}).json()
        assert reply["encoding"] == "probs" and "final_logit_softcapping" in reply["encoding_refused"]
        rows = http.post("/lm_head_rows", content=wire.encode({"selected_token_ids": mapping[0]}))
        assert rows.status_code == 422 and "not available for this model" in rows.json()["error"]
    inputs = random_batch(reference.vocab_size, 2, 12, seed=96)
    expected = in_process(reference, GenerateInputs(*inputs), VocabMapping(*mapping))
    with caplog.at_level(logging.WARNING, logger="eagle3_client.backend"):
        with connect(server.url, "hidden", mapping) as remote:
            assert remote.encoding_stats()["negotiated"] == {server.url: "probs"}
            assert_bit_exact(remote.generate_batch(*inputs), expected)
    assert "instead of the requested 'hidden'" in caplog.text and "softcapping" in caplog.text
    with connect(server.url, "logits", mapping) as remote:  # soft-capped logits travel as they are
        assert_bit_exact(remote.generate_batch(*inputs), expected)


@pytest.mark.parametrize(("encoding", "verdict"), [("logits", "logits: bit-exact=yes"), ("topk:8", "exactly top-K")])
def test_validate_checks_an_encoding_as_it_promises(
    server: ServerProcess, cache_dir: Path, encoding: str, verdict: str
) -> None:
    from typer.testing import CliRunner

    from eagle3_appliance.cli import app

    args = ["validate", "--url", server.url, "--cache-dir", str(cache_dir), "--device", "cpu"]
    args += ["--encoding", encoding, "--batches", "1", "--seq-len", "32"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert verdict in result.output and "PASS" in result.output
