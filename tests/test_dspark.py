"""The DSpark capture over real HTTP: negotiated per session, checked, bounded, refused where it cannot be served.

Values are checked against transformers' own ``output_hidden_states`` here (entry 0 is the
embedding output, entry ``i + 1`` the output of decoder layer ``i``, the last entry taken after
the final norm); the comparison with upstream's ``HFDSparkTargetModel`` is
``tests/integration/test_dspark_target.py``.
"""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest
import torch

from eagle3_appliance.launch import ServerProcess
from eagle3_appliance.sizes import ModelShape, capture_rows
from eagle3_client import CaptureUnsupported, RemoteDSparkTargetModel, TargetHTTPError, protocol
from eagle3_client.capture import KEY_HIDDEN_STATES, KEY_LAST_HIDDEN_STATES, Capture
from eagle3_client.dspark import dspark_batch_type
from eagle3_client.errors import ProtocolViolation
from eagle3_client.remote.request import encode_request
from eagle3_client.remote.session import ServerSession
from eagle3_client.synthetic import random_batch
from eagle3_client.transports.control import ControlPlane
from eagle3_client.transports.dataplane import check_supervision

VOCAB = 1024


@pytest.fixture(scope="module")
def hf_model(model_dir: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).requires_grad_(False)


def test_the_answer_is_the_embedding_layer_outputs_and_the_final_norm(
    server: ServerProcess, hf_model: torch.nn.Module
) -> None:
    layers = [-1, 2, 7]  # the embedding, a middle layer, the last layer (post-norm)
    inputs = random_batch(VOCAB, 2, 24, seed=21, pad=True)
    with RemoteDSparkTargetModel.from_urls([server.url], target_layer_ids=layers, data_plane="wire") as remote:
        batch = remote.generate_batch(*inputs)
    with torch.no_grad():
        out = hf_model(input_ids=inputs[0], attention_mask=inputs[1], output_hidden_states=True, use_cache=False)
    states = out.hidden_states
    expected = torch.cat([states[0], states[3], states[8]], dim=-1)
    assert type(batch) is dspark_batch_type()
    assert batch.target_hidden_states.dtype == expected.dtype and torch.equal(batch.target_hidden_states, expected)
    assert torch.equal(batch.target_last_hidden_states, states[8])
    assert torch.equal(batch.input_ids, inputs[0]) and torch.equal(batch.loss_mask, inputs[2])
    assert (batch.position_ids, batch.seq_lens, batch.doc_remaining) == (None, None, None)


@pytest.mark.parametrize(
    ("capture", "message"),
    [
        ({"kind": "dspark", "layers": [-1, 3, 8]}, r"layer id\(s\) \[8\] are out of range"),
        ({"kind": "dspark", "layers": [-2, 3]}, r"layer id\(s\) \[-2\] are out of range"),
        ({"kind": "dspark", "layers": [1, 5, 3]}, r"strictly increasing; \[3\]"),
        ({"kind": "dspark", "layers": [2, 2]}, r"strictly increasing; \[2\]"),
        ({"kind": "dspark", "layers": []}, "at least one decoder layer"),
        ({"kind": "dspark", "layers": [1], "logits": True}, "a dspark capture takes no logits"),
    ],
)
def test_a_bad_dspark_capture_is_a_422_naming_it(server: ServerProcess, capture: object, message: str) -> None:
    resp = httpx.post(server.url + "/session", json={"client": "t", "capture": capture}, trust_env=False)
    assert resp.status_code == 422
    assert re.search(message, resp.json()["error"]), resp.text


def test_the_client_reports_the_servers_refusal_of_layer_ids(server: ServerProcess) -> None:
    with RemoteDSparkTargetModel.from_urls([server.url], target_layer_ids=[-1, 9], max_retries=0) as remote:
        with pytest.raises(TargetHTTPError, match=r"\[9\] are out of range") as info:
            remote.generate_batch(*random_batch(VOCAB, 1, 8, seed=1))
    assert info.value.status == 422


def test_a_text_only_server_refuses_dspark_vision_inputs_naming_them(server: ServerProcess) -> None:
    ids, attention, loss = random_batch(VOCAB, 2, 8, seed=3)
    vision = {"pixel_values": torch.zeros(4, 48), "image_grid_thw": torch.tensor([[1, 2, 2]])}
    with RemoteDSparkTargetModel.from_urls([server.url], target_layer_ids=[-1, 3], max_retries=0) as remote:
        refused = r"\['image_grid_thw', 'pixel_values'\]: this server takes no vision"
        with pytest.raises(TargetHTTPError, match=refused) as info:
            remote.generate_batch(ids, attention, loss, **vision)
        assert info.value.status == 422
        with pytest.raises(TargetHTTPError, match="this server takes no vision inputs"):
            remote.generate_batch_async(ids, attention, loss, **vision).result(60)
        batch = remote.generate_batch(ids, attention, loss)  # the same session serves text-only batches
        assert batch.target_hidden_states.shape[-1] == 2 * batch.target_last_hidden_states.shape[-1]


def test_a_dspark_request_carries_vision_tensors_or_packing_not_both() -> None:
    capture = Capture.dspark([-1, 3])
    request = protocol.GenerateRequest.from_keys([*protocol.GENERATE_INPUT_KEYS, "pixel_values"], capture)
    assert request.vision == ("pixel_values",) and not request.packed
    packed = protocol.GenerateRequest.from_keys(protocol.SAMPLE_INPUT_KEYS, capture)
    assert packed.packed and packed.vision == ()
    with pytest.raises(ValueError, match=r"vision tensors \['pixel_values'\] or packing keys, not both"):
        protocol.GenerateRequest.from_keys([*protocol.SAMPLE_INPUT_KEYS, "pixel_values"], capture)
    ids, attention, loss = random_batch(VOCAB, 1, 8, seed=4)
    positions = torch.arange(8).unsqueeze(0)
    packing = (positions, torch.tensor([[8]]), 8 - positions)
    with pytest.raises(ValueError, match="vision inputs or packed rows, not both"):
        encode_request(ids, attention, loss, *packing, capture=capture, vision={"pixel_values": torch.zeros(4, 48)})


def test_layer_ids_out_of_order_are_refused_before_anything_is_sent() -> None:
    with pytest.raises(ValueError, match="strictly increasing"):
        RemoteDSparkTargetModel.from_urls(["http://nowhere:1"], target_layer_ids=[3, 1])
    with pytest.raises(ValueError, match="at least one"):
        RemoteDSparkTargetModel.from_urls(["http://nowhere:1"], target_layer_ids=[])


def _session_against(handler: object) -> ServerSession:
    control = ControlPlane("http://other:8001", transport=httpx.MockTransport(handler))  # type: ignore[arg-type]
    return ServerSession(control, "t", capture=Capture.dspark([-1, 3]))


def test_an_upstream_server_is_refused_before_anything_is_sent() -> None:
    paths: list[str] = []

    def upstream(request: httpx.Request) -> httpx.Response:
        paths.append(request.url.path)
        if request.url.path == "/session":
            return httpx.Response(404, json={"error": "not found"})
        return httpx.Response(200, json={"status": "ok"})

    session = _session_against(upstream)
    with pytest.raises(CaptureUnsupported, match=r"upstream EAGLE-3 server .* dspark capture of layers \[-1, 3\]"):
        session.join(rejoin=False)
    session.close()
    assert "/generate" not in paths


def test_an_appliance_that_ignores_the_capture_is_refused() -> None:
    def old_server(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/session":
            return httpx.Response(200, json={"session_id": "abc", "encoding": "probs", "data_planes": ["wire"]})
        return httpx.Response(200, json={"status": "ok"})

    session = _session_against(old_server)
    with pytest.raises(CaptureUnsupported, match="did not agree to the dspark capture"):
        session.join(rejoin=False)
    session.close()


def test_the_capture_on_the_wire_and_on_the_command_line() -> None:
    dspark = Capture.dspark([-1, 4, 7])
    body = protocol.SessionOffer(client="c", capture=dspark).to_json()
    assert body["capture"] == {"kind": "dspark", "layers": [-1, 4, 7], "logits": False}
    assert protocol.SessionReply.from_json({"session_id": "s", "capture": body["capture"]}).capture == dspark
    assert dspark.spec == "dspark:-1,4,7" and Capture.parse(dspark.spec) == dspark
    assert dspark.keys == (KEY_HIDDEN_STATES, KEY_LAST_HIDDEN_STATES) and dspark.label == "dspark"
    assert dspark.checked(8) == dspark
    with pytest.raises(ValueError, match="'dspark:L1,L2,...'"):
        Capture.parse("dspark+logits:1,2")


def test_a_dspark_answer_must_carry_both_tensors() -> None:
    h, last = torch.zeros(1, 2, 8), torch.zeros(1, 2, 4)
    checked = check_supervision("u", {KEY_HIDDEN_STATES: h, KEY_LAST_HIDDEN_STATES: last})
    assert list(checked) == [KEY_HIDDEN_STATES, KEY_LAST_HIDDEN_STATES]
    with pytest.raises(ProtocolViolation):
        check_supervision("u", {KEY_HIDDEN_STATES: h, KEY_LAST_HIDDEN_STATES: None})
    with pytest.raises(ProtocolViolation):
        check_supervision("u", {KEY_HIDDEN_STATES: h, KEY_LAST_HIDDEN_STATES: last, "logits": h})


def test_the_sizes_rows_count_the_final_norm() -> None:
    shape = ModelShape("m", hidden_size=64, vocab_size=VOCAB, num_hidden_layers=8)
    (row,) = capture_rows(shape, captures=["dspark:-1,3,7"], dtype_bytes=4, batch_tokens=10)
    assert row.bytes_per_token == 4 * 64 * 4
    with pytest.raises(ValueError, match="out of range"):
        capture_rows(shape, captures=["dspark:-1,8"], dtype_bytes=4, batch_tokens=10)


def test_the_dspark_recipe_refuses_the_stream_for_configs_without_text_batches() -> None:
    """DSpark trains from the stream (text targets); ``multimodal: true`` and ``cached_target_path``
    are refused at setup, before anything loads, naming why."""
    from eagle3_client.automodel import remote_dspark_recipe
    from eagle3_client.automodel_launch import check_config

    check_config({"recipe": "TrainDSparkRecipe", "recipe_args": {"target_model_backend": "stream"}})  # accepted

    class Recipe:
        def __init__(self, recipe_args: dict[str, object]) -> None:
            self.cfg = type("Cfg", (), {"recipe_args": recipe_args})()

        def setup(self) -> str:
            return "upstream's setup"

    recipe_cls = remote_dspark_recipe(Recipe)
    for key, value in (("multimodal", True), ("cached_target_path", "/cache")):
        recipe = recipe_cls({"target_model_backend": "stream", key: value})
        with pytest.raises(ValueError, match=f"cannot train with target_model_backend: stream: {key}"):
            recipe.setup()
    assert recipe_cls({"target_model_backend": "colocated"}).setup() == "upstream's setup"
