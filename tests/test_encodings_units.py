"""Encodings without a server: names, the size calculator and ``sizes``, decoding, negotiation, model checks."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import httpx
import pytest
import torch
from typer.testing import CliRunner

from eagle3_appliance.cli import app
from eagle3_appliance.core.inputs import GenerateInputs, VocabMapping
from eagle3_appliance.model import supervision
from eagle3_appliance.model.loading import load_target
from eagle3_appliance.model.outputs import ForwardOutputs
from eagle3_appliance.serving import negotiation
from eagle3_appliance.settings import Device, Settings
from eagle3_client import ProtocolViolation, protocol, wire
from eagle3_client.encodings import (
    Encoding,
    decode_supervision,
    parse_encoding,
    payload_bytes_per_token,
    response_bytes,
    topk_index_dtype,
    wire_bytes_per_token,
)
from eagle3_client.protocol import SessionOffer
from eagle3_client.transports.dataplane import check_supervision
from tests.test_client import SUPERVISION, make_remote, upstream_server

runner = CliRunner()


@pytest.mark.parametrize(
    ("name", "kind", "k"),
    [("probs", "probs", None), ("logits", "logits", None), (" Hidden ", "hidden", None), ("topk:64", "topk", 64)],
)
def test_encoding_names_parse(name: str, kind: str, k: int | None) -> None:
    encoding = parse_encoding(name)
    assert (encoding.kind, encoding.k) == (kind, k)
    assert parse_encoding(encoding.name) == encoding
    assert encoding.lossy == (kind == "topk")


@pytest.mark.parametrize("name", ["", "prob", "topk", "topk:", "topk:-1", "topk:0", "topk:1.5", "logits:2", "hidden:"])
def test_bad_encoding_names_are_value_errors(name: str) -> None:
    with pytest.raises(ValueError):
        parse_encoding(name)


# -- sizes ---------------------------------------------------------------------------------


def test_bytes_per_token_for_llama_3_1_8b_with_a_32k_draft_vocabulary() -> None:
    dims = {"hidden_size": 4096, "draft_vocab": 32768, "dtype_bytes": 2}
    sizes = {name: wire_bytes_per_token(name, **dims) for name in ("probs", "logits", "hidden", "topk:64")}
    assert sizes == {"probs": 155_665, "logits": 90_129, "hidden": 32_785, "topk:64": 24_977}
    assert payload_bytes_per_token("probs", **dims) / sizes["probs"] == pytest.approx(0.842, abs=1e-3)
    assert wire_bytes_per_token("probs", hidden_size=8192, draft_vocab=32768, dtype_bytes=2) == 180_241


def test_topk_indices_are_int16_up_to_32768_entries() -> None:
    assert topk_index_dtype(32768) == torch.int16 and topk_index_dtype(32769) == torch.int32
    assert payload_bytes_per_token("topk:10", hidden_size=1, draft_vocab=32768, dtype_bytes=2) == 60
    assert payload_bytes_per_token("topk:10", hidden_size=1, draft_vocab=32769, dtype_bytes=2) == 80


def test_response_bytes_equal_the_encoded_length() -> None:
    batch, seq, hidden, draft = 2, 5, 8, 40
    for name in ("probs", "logits", "hidden", "topk:3"):
        enc = parse_encoding(name)
        shapes = {
            "aux_hidden_states": ((batch, seq, 3 * hidden), torch.bfloat16),
            "target_probs": ((batch, seq, draft), torch.float32),
            protocol.KEY_DRAFT_LOGITS: ((batch, seq, draft), torch.bfloat16),
            protocol.KEY_FINAL_HIDDEN: ((batch, seq, hidden), torch.bfloat16),
            protocol.KEY_TOPK_VALUES: ((batch, seq, 3), torch.float32),
            protocol.KEY_TOPK_INDICES: ((batch, seq, 3), torch.int16),
            "position_mask": ((batch, seq, 1), torch.bool),
            "input_ids": ((batch, seq), torch.int64),
            "loss_mask": ((batch, seq), torch.int64),
        }
        tensors = {key: torch.zeros(*shapes[key][0], dtype=shapes[key][1]) for key in enc.keys}
        expected = response_bytes(enc, batch=batch, seq_len=seq, hidden_size=hidden, draft_vocab=draft, dtype_bytes=2)
        assert len(wire.encode(tensors)) == expected, name


def test_sizes_command_prints_presets_and_reads_a_config_folder(tmp_path: Path) -> None:
    result = runner.invoke(app, ["sizes", "--model", "llama-3.1-8b", "--model", "llama-3.1-70b", "--markdown"])
    assert result.exit_code == 0, result.output
    assert "| llama-3.1-8b | probs | 155,665 | 304.0 MiB | 100.0 % | yes |" in result.output
    assert "| llama-3.1-8b | hidden | 32,785 | 64.0 MiB | 21.1 % | ~ |" in result.output
    assert "| llama-3.1-70b | topk:64 | 49,553 |" in result.output
    (tmp_path / "config.json").write_text(json.dumps({"text_config": {"hidden_size": 64, "vocab_size": 1024}}))
    result = runner.invoke(
        app, ["sizes", "--model", str(tmp_path), "--draft-vocab", "512", "--dtype", "float32", "--encoding", "logits"]
    )
    assert result.exit_code == 0, result.output
    expected = wire_bytes_per_token("logits", hidden_size=64, draft_vocab=512, dtype_bytes=4)
    assert f"logits    {expected:,}" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "gpt-9"], "neither a preset"),
        (["--model", "qwen3-8b", "--draft-vocab", "200000"], "must lie in [1, 151936]"),
        (["--model", "qwen3-8b", "--encoding", "topk:0"], "K >= 1"),
    ],
)
def test_sizes_command_rejects_bad_input(args: list[str], message: str) -> None:
    result = runner.invoke(app, ["sizes", *args], env={"COLUMNS": "300", "TERMINAL_WIDTH": "300"})
    assert result.exit_code == 2 and message in result.output, result.output


# -- decoding and the answer's keys ----------------------------------------------------------------


def test_topk_decoding_scatters_renormalises_and_reports_the_kept_mass() -> None:
    values = torch.tensor([[[0.5, 0.25], [0.2, 0.2]]])
    indices = torch.tensor([[[40000, 3], [0, 1]]], dtype=torch.int32)
    tensors = {
        protocol.KEY_TOPK_VALUES: values,
        protocol.KEY_TOPK_INDICES: indices,
        "position_mask": torch.ones(1, 2, 1, dtype=torch.bool),
    }
    decoded = decode_supervision(tensors, Encoding("topk", 2), device=torch.device("cpu"), draft_vocab=40001)
    assert decoded.target_probs.shape == (1, 2, 40001)
    assert decoded.target_probs[0, 0, 40000] == pytest.approx(2 / 3) and decoded.target_probs[0, 1, 1] == 0.5
    assert torch.allclose(decoded.kept_mass, torch.tensor([[0.75, 0.4]]))
    with pytest.raises(ProtocolViolation, match="outside the draft vocabulary"):
        decode_supervision(tensors, Encoding("topk", 2), device=torch.device("cpu"), draft_vocab=40000)


def test_the_answer_must_carry_the_keys_of_the_encoding_its_header_names() -> None:
    logits_answer = {"aux_hidden_states": torch.zeros(1), protocol.KEY_DRAFT_LOGITS: torch.zeros(1)}
    logits_answer.update({k: torch.zeros(1) for k in ("position_mask", "input_ids", "loss_mask")})
    assert list(check_supervision("u", logits_answer, "logits")) == list(protocol.ENCODING_KEYS["logits"])
    with pytest.raises(ProtocolViolation, match="said it used encoding 'hidden'"):
        check_supervision("u", logits_answer, "hidden")
    with pytest.raises(ProtocolViolation, match="unknown supervision encoding"):
        check_supervision("u", logits_answer, "zip")
    with pytest.raises(ProtocolViolation, match="lacks"):
        check_supervision("u", {**logits_answer, "loss_mask": None}, "logits")


def test_against_an_upstream_server_a_requested_encoding_falls_back_to_probs(caplog: pytest.LogCaptureFixture) -> None:
    remote, recorder = make_remote(upstream_server, encoding="hidden")
    with caplog.at_level(logging.WARNING, logger="eagle3_client.backend"):
        remote.set_vocab_mapping(torch.arange(5), torch.ones(9, dtype=torch.bool))
        batch = remote.generate_batch(torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 3), torch.ones(1, 3))
    for key, value in SUPERVISION.items():
        assert torch.equal(getattr(batch, key), value)
    remote.close()
    assert "upstream server" in caplog.text and "'hidden'" in caplog.text
    assert [r.url.path for r in recorder.requests] == ["/session", "/set_vocab_mapping", "/generate", "/disconnect"]
    assert json.loads(recorder.requests[0].content)["encoding"] == "hidden"  # what upstream ignored with a 404
    assert remote.encoding_stats()["batches"] == {"probs": 1}


def test_a_header_that_contradicts_the_body_is_a_protocol_violation() -> None:
    def liar(request: httpx.Request, n: int) -> httpx.Response:
        if request.url.path == "/generate":
            return httpx.Response(200, content=wire.encode(SUPERVISION), headers={protocol.ENCODING_HEADER: "logits"})
        return upstream_server(request, n)

    remote, _ = make_remote(liar)
    with pytest.raises(ProtocolViolation, match="said it used encoding 'logits'"):
        remote.generate_batch(torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 3), torch.ones(1, 3))


# -- server side: negotiation and the model check for "hidden" --------------------------------------


def test_negotiation_picks_the_first_usable_offer() -> None:
    offer = SessionOffer.from_json({"encoding": "hidden", "encodings": ["hidden", "topk:4", "probs"]})
    offered = negotiation.offered_encodings(offer)
    assert [e.name for e in offered] == ["hidden", "topk:4", "probs"]
    assert negotiation.choose_encoding(offered, None) == (parse_encoding("hidden"), None)
    chosen, why = negotiation.choose_encoding(offered, "the LM head has a bias")
    assert chosen.name == "topk:4" and "bias" in why
    assert negotiation.offered_encodings(SessionOffer.from_json({}))[0].name == "probs"
    with pytest.raises(negotiation.EncodingError, match="bias"):
        negotiation.choose_encoding([parse_encoding("hidden")], "the LM head has a bias")


def _fresh_target(model_dir: Path):  # noqa: ANN202 - a Target
    return load_target(Settings(model=str(model_dir), device=Device.cpu))


def test_hidden_is_accepted_for_the_builtin_model(model_dir: Path) -> None:
    assert _fresh_target(model_dir).hidden_refusal() is None


def test_hidden_is_refused_when_the_head_has_a_bias(model_dir: Path) -> None:
    target = _fresh_target(model_dir)
    head = target.model.lm_head
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    biased.weight = head.weight
    target.model.lm_head = biased
    assert target.hidden_refusal() == "the LM head has a bias"


def test_hidden_is_refused_when_a_config_announces_a_logit_transform(model_dir: Path) -> None:
    target = _fresh_target(model_dir)
    target.model.config.logit_scale = 0.0625
    assert "logit_scale=0.0625" in target.hidden_refusal()


def test_hidden_is_refused_when_the_probe_sees_an_unannounced_transform(model_dir: Path) -> None:
    target = _fresh_target(model_dir)
    target.model.lm_head.register_forward_hook(lambda _m, _i, out: out * 0.5)
    assert "not exactly linear" in target.hidden_refusal()


def test_topk_encoder_uses_int32_indices_beyond_32768_entries() -> None:
    torch.manual_seed(0)
    logits = torch.randn(1, 3, 40000)
    out = ForwardOutputs(torch.zeros(1, 3, 6), logits)
    ids = torch.randperm(40000)[:33000]
    mask = torch.zeros(40000, dtype=torch.bool)
    mask[ids] = True
    ids_in = torch.zeros(1, 3, dtype=torch.long)
    inputs = GenerateInputs(ids_in, torch.ones_like(ids_in), torch.ones_like(ids_in))
    encoded = supervision.encode(parse_encoding("topk:5"), out, inputs, VocabMapping(ids, mask))
    assert encoded[protocol.KEY_TOPK_INDICES].dtype == torch.int32
    reference = supervision.encode(parse_encoding("probs"), out, inputs, VocabMapping(ids, mask))["target_probs"]
    assert torch.equal(encoded[protocol.KEY_TOPK_VALUES], reference.topk(5, -1).values)
    small = supervision.encode(parse_encoding("topk:5"), out, inputs, VocabMapping(ids[:32768], mask))
    assert small[protocol.KEY_TOPK_INDICES].dtype == torch.int16


@pytest.mark.parametrize(
    "name",
    [
        "eagle3_client.encodings",
        "eagle3_appliance.serving.negotiation",
        "eagle3_appliance.model.supervision",
        "eagle3_appliance.sizes",
    ],
)
def test_every_name_in_all_exists(name: str) -> None:
    import importlib

    module = importlib.import_module(name)
    assert [n for n in module.__all__ if not hasattr(module, n)] == []
