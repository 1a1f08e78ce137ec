"""The EAGLE-1/2 capture over real HTTP: negotiated per session, checked, bounded, refused where it cannot be served.

Values are checked against transformers' own forward here (the last entry of ``hidden_states``
is the final norm's output, the logits are the LM head's output on it); the comparison with
upstream's ``HFEagleTargetModel`` is ``tests/integration/test_eagle_target.py``.
"""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest
import torch

from eagle3_appliance.launch import ServerProcess
from eagle3_appliance.sizes import ModelShape, capture_rows
from eagle3_client import CaptureUnsupported, RemoteEagleTargetModel, protocol, wire
from eagle3_client.capture import EAGLE_KEYS, KEY_LAST_HIDDEN_STATES, KEY_LOGITS, Capture
from eagle3_client.eagle import eagle_batch_type
from eagle3_client.errors import ProtocolViolation
from eagle3_client.remote.session import ServerSession
from eagle3_client.synthetic import random_batch
from eagle3_client.transports.control import ControlPlane
from eagle3_client.transports.dataplane import check_supervision

VOCAB = 1024


@pytest.fixture(scope="module")
def hf_model(model_dir: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).requires_grad_(False)


def _shifted(t: torch.Tensor) -> torch.Tensor:
    return torch.cat((t[:, 1:], torch.zeros_like(t[:, :1])), dim=1)


def test_the_answer_is_the_last_hidden_state_and_its_logits_shifted(
    server: ServerProcess, hf_model: torch.nn.Module
) -> None:
    inputs = random_batch(VOCAB, 2, 24, seed=31, pad=True)
    with RemoteEagleTargetModel.from_urls([server.url], data_plane="wire") as remote:
        batch = remote.generate_batch(*inputs)
    with torch.no_grad():
        out = hf_model(input_ids=inputs[0], attention_mask=inputs[1], output_hidden_states=True, use_cache=False)
    last = out.hidden_states[-1]
    assert type(batch) is eagle_batch_type()
    assert batch.input_hidden_states.dtype == last.dtype and torch.equal(batch.input_hidden_states, last)
    assert torch.equal(batch.target_hidden_states, _shifted(last))
    assert torch.equal(batch.target_logits, _shifted(out.logits))
    assert torch.equal(batch.input_ids, _shifted(inputs[0])) and torch.equal(batch.loss_mask, _shifted(inputs[2]))
    assert torch.equal(batch.attention_mask, inputs[1])  # unshifted, as upstream's
    assert bool((batch.target_logits[:, -1] == 0).all())  # the zero tail
    assert (batch.position_ids, batch.seq_lens, batch.doc_remaining) == (None, None, None)


@pytest.mark.parametrize(
    ("capture", "message"),
    [
        ({"kind": "eagle", "layers": [3]}, "an eagle capture takes no layers or logits"),
        ({"kind": "eagle", "logits": True}, "an eagle capture takes no layers or logits"),
    ],
)
def test_a_bad_eagle_capture_is_a_422_naming_it(server: ServerProcess, capture: object, message: str) -> None:
    resp = httpx.post(server.url + "/session", json={"client": "t", "capture": capture}, trust_env=False)
    assert resp.status_code == 422
    assert re.search(message, resp.json()["error"]), resp.text


def test_streams_refuse_an_eagle_session(server: ServerProcess) -> None:
    """A stream carries EAGLE-3, DFlash and DSpark answers; an eagle session asks /generate."""
    http = httpx.Client(base_url=server.url, timeout=60, trust_env=False)
    offer = protocol.SessionOffer(client="t", capture=Capture.eagle(), capabilities=(protocol.CAPABILITY_STREAM,))
    reply = http.post("/session", json=offer.to_json())
    assert reply.status_code == 200 and reply.json()["capture"]["kind"] == "eagle", reply.text
    headers = {protocol.SESSION_HEADER: reply.json()["session_id"]}
    ids, attention, loss = random_batch(VOCAB, 1, 8, seed=5)
    body = wire.encode({"input_ids": ids, "attention_mask": attention, "loss_mask": loss})
    resp = http.post("/stream/produce", content=body, headers={**headers, protocol.SAMPLE_HEADER: "r/s1"})
    assert resp.status_code >= 400 and "not the eagle capture: ask /generate" in resp.text, resp.text
    http.post("/disconnect", json={}, headers=headers)
    http.close()


def test_the_capture_on_the_wire_and_on_the_command_line() -> None:
    eagle = Capture.eagle()
    body = protocol.SessionOffer(client="c", capture=eagle).to_json()
    assert body["capture"] == {"kind": "eagle", "layers": [], "logits": False}
    assert protocol.SessionReply.from_json({"session_id": "s", "capture": body["capture"]}).capture == eagle
    assert eagle.spec == "eagle" and Capture.parse(" eagle ") == eagle and Capture.parse(eagle.spec) == eagle
    assert eagle.keys == EAGLE_KEYS == (KEY_LAST_HIDDEN_STATES, KEY_LOGITS) and eagle.label == "eagle"
    assert eagle.is_eagle and not eagle.is_eagle3 and not eagle.takes_vision and not eagle.takes_layers
    assert eagle.checked(8) == eagle and eagle.named == "the eagle capture"
    with pytest.raises(ValueError, match="'eagle'"):
        Capture.parse("eagle:1,2")


def test_an_eagle_answer_must_carry_both_tensors() -> None:
    last, logits = torch.zeros(1, 2, 4), torch.zeros(1, 2, 16)
    checked = check_supervision("u", {KEY_LAST_HIDDEN_STATES: last, KEY_LOGITS: logits})
    assert list(checked) == list(EAGLE_KEYS)
    with pytest.raises(ProtocolViolation):
        check_supervision("u", {KEY_LAST_HIDDEN_STATES: last, KEY_LOGITS: None})
    with pytest.raises(ProtocolViolation):
        check_supervision("u", {KEY_LAST_HIDDEN_STATES: last})
    with pytest.raises(ProtocolViolation):
        check_supervision("u", {KEY_LAST_HIDDEN_STATES: last, KEY_LOGITS: logits, "inputs_embeds": last})


def test_the_sizes_rows_count_the_last_hidden_state_and_the_logits() -> None:
    shape = ModelShape("m", hidden_size=64, vocab_size=VOCAB, num_hidden_layers=8)
    (row,) = capture_rows(shape, captures=["eagle"], dtype_bytes=4, batch_tokens=10)
    assert row.bytes_per_token == (64 + VOCAB) * 4 and row.name == "eagle"


def test_an_upstream_server_is_refused_before_anything_is_sent() -> None:
    paths: list[str] = []

    def upstream(request: httpx.Request) -> httpx.Response:
        paths.append(request.url.path)
        if request.url.path == "/session":
            return httpx.Response(404, json={"error": "not found"})
        return httpx.Response(200, json={"status": "ok"})

    control = ControlPlane("http://other:8001", transport=httpx.MockTransport(upstream))
    session = ServerSession(control, "t", capture=Capture.eagle())
    with pytest.raises(CaptureUnsupported, match=r"upstream EAGLE-3 server .* the eagle capture, and would"):
        session.join(rejoin=False)
    session.close()
    assert "/generate" not in paths


def test_the_launcher_refuses_the_stream_backend_for_eagle_recipes() -> None:
    from eagle3_client.automodel_launch import check_config

    for recipe in ("TrainEagle1Recipe", "TrainEagle2Recipe", "TrainVispecStage1Recipe"):
        cfg = {"recipe": recipe, "recipe_args": {"target_model_backend": "stream"}}
        with pytest.raises(SystemExit, match=f"{recipe}.*target_model_backend: remote"):
            check_config(cfg)
        check_config({**cfg, "recipe_args": {"target_model_backend": "remote"}})  # accepted
