"""The ViSpec and MSD captures: negotiated per session, vision inputs checked by name, dtype and size.

Over real HTTP: a tiny Qwen2-VL appliance (random weights, ``tests/vlm_support.py``) and the
built-in text-only one. The bit-for-bit comparison with upstream's wrappers is
``tests/integration/test_vlm_target.py``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from eagle3_appliance.errors import InvalidTensors
from eagle3_appliance.launch import ServerProcess
from eagle3_appliance.model.vlm import VisionRules
from eagle3_appliance.serving.vision_inputs import validate_vision
from eagle3_client import (
    CaptureUnsupported,
    RemoteMSDTargetModel,
    RemoteVispecTargetModel,
    TargetHTTPError,
    protocol,
    wire,
)
from eagle3_client.capture import KEY_HIDDEN_STATES, KEY_INPUTS_EMBEDS, KEY_LOGITS, VLM_KEYS, Capture
from eagle3_client.remote.request import encode_request
from eagle3_client.remote.session import ServerSession
from eagle3_client.transports.control import ControlPlane
from eagle3_client.transports.dataplane import check_supervision
from eagle3_client.vlm import shift_left
from tests.vlm_support import APPLIANCE_ARGS, IMAGE_TOKEN, make_tiny_vlm, vlm_batch


@pytest.fixture(scope="module")
def vlm_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    folder = make_tiny_vlm(tmp_path_factory.mktemp("vlm") / "model")
    log = tmp_path_factory.mktemp("vlm-logs") / "server.log"
    with ServerProcess(["--model", str(folder), *APPLIANCE_ARGS], log_path=log) as proc:
        yield proc


def _session(url: str, kind: str) -> str:
    resp = httpx.post(url + "/session", json={"client": "t", "capture": {"kind": kind}}, trust_env=False)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["capture"] == {"kind": kind, "layers": [], "logits": False}
    assert body["image_token_id"] == IMAGE_TOKEN
    return str(body["session_id"])


def _generate(url: str, session_id: str, tensors: dict[str, torch.Tensor]) -> httpx.Response:
    return httpx.post(
        url + "/generate",
        content=wire.encode(tensors),
        headers={protocol.SESSION_HEADER: session_id},
        trust_env=False,
        timeout=60,
    )


def _body(seed: int = 1) -> dict[str, torch.Tensor]:
    ids, attention, loss, vision = vlm_batch(seed)
    return {"input_ids": ids, "attention_mask": attention, "loss_mask": loss, **vision}  # type: ignore[dict-item]


# -- the capture, the request and the answer on the wire -----------------------------------


def test_the_capture_on_the_wire_and_on_the_command_line() -> None:
    for capture, kind in ((Capture.vispec(), "vispec"), (Capture.msd(), "msd")):
        body = protocol.SessionOffer(client="c", capture=capture).to_json()
        assert body["capture"] == {"kind": kind, "layers": [], "logits": False}
        reply = protocol.SessionReply(session_id="s", capture=capture, image_token_id=7).to_json()
        assert protocol.SessionReply.from_json(reply).capture == capture
        assert protocol.SessionReply.from_json(reply).image_token_id == 7
        assert capture.spec == kind and Capture.parse(kind) == capture and capture.label == kind
        assert capture.keys == VLM_KEYS == (KEY_INPUTS_EMBEDS, KEY_HIDDEN_STATES, KEY_LOGITS)
        assert capture.is_vlm and not capture.is_eagle3 and capture.checked(4) == capture
        with pytest.raises(ValueError, match=f"a {kind} capture takes no layers or logits"):
            Capture.from_json({"kind": kind, "layers": [1]})
        with pytest.raises(ValueError, match=f"a {kind} capture takes no layers or logits"):
            Capture.from_json({"kind": kind, "logits": True})
    assert "image_token_id" not in protocol.SessionReply(session_id="s").to_json()


def test_a_request_names_its_vision_tensors_and_only_a_vlm_capture_carries_them() -> None:
    ids, attention, loss, vision = vlm_batch(3)
    request, payload, packing = encode_request(ids, attention, loss, capture=Capture.vispec(), vision=vision)
    assert request.vision == ("image_grid_thw", "mm_token_type_ids", "pixel_values") and packing is None
    decoded = wire.decode(payload)
    assert list(decoded) == list(request.keys)
    assert torch.equal(decoded["pixel_values"], vision["pixel_values"])  # type: ignore[index]
    assert protocol.GenerateRequest.from_keys(request.keys, Capture.vispec()) == request
    with pytest.raises(ValueError, match=r"unexpected keys \['image_grid_thw', 'mm_token_type_ids', 'pixel_values'\]"):
        protocol.GenerateRequest.from_keys(request.keys, Capture.dflash([1]))
    with pytest.raises(ValueError, match="a dflash request carries no vision inputs"):
        encode_request(ids, attention, loss, capture=Capture.dflash([1]), vision=vision)
    with pytest.raises(ValueError, match=r"may not be named \['position_ids'\]"):
        encode_request(ids, attention, loss, capture=Capture.msd(), vision={"position_ids": ids})
    with pytest.raises(TypeError, match=r"\['image_sizes'\] are not"):
        encode_request(ids, attention, loss, capture=Capture.msd(), vision={"image_sizes": [1, 2]})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="carries no packing keys"):
        protocol.GenerateRequest.from_keys([*protocol.SAMPLE_INPUT_KEYS, "pixel_values"], Capture.vispec())


def test_a_vlm_answer_must_carry_its_three_tensors() -> None:
    e, h, logits = torch.zeros(1, 3, 4), torch.ones(1, 3, 4), torch.full((1, 3, 8), 2.0)
    checked = check_supervision("u", {KEY_INPUTS_EMBEDS: e, KEY_HIDDEN_STATES: h, KEY_LOGITS: logits})
    assert list(checked) == list(VLM_KEYS) and torch.equal(checked[KEY_LOGITS], logits)
    from eagle3_client.errors import ProtocolViolation

    with pytest.raises(ProtocolViolation):
        check_supervision("u", {KEY_INPUTS_EMBEDS: e, KEY_HIDDEN_STATES: h})


def test_shift_left_moves_one_position_and_zero_fills() -> None:
    t = torch.arange(6).view(1, 6)
    assert shift_left(t).tolist() == [[1, 2, 3, 4, 5, 0]]
    assert shift_left(torch.ones(2, 3, 2)).sum().item() == 8.0


# -- the server's checks of the vision tensors ---------------------------------------------

RULES = VisionRules(
    "Qwen2VLModel.forward",
    frozenset({"pixel_values", "image_grid_thw", "mm_token_type_ids"}),
    (torch.float32,),
    max_patches=64,
)


@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        ({"pixel_values": torch.zeros(16, 48), "image_sizes": torch.ones(1, 2)}, r"\['image_sizes'\] are not inputs"),
        ({"pixel_values": torch.zeros(16, 48, dtype=torch.float64)}, "pixel_values has dtype float64"),
        ({"image_grid_thw": torch.ones(1, 3)}, "image_grid_thw has dtype float32; expected one of int64, int32"),
        ({"pixel_values": torch.zeros(65, 48)}, "pixel_values has 65 rows; this server takes at most 64"),
        ({"pixel_values": torch.full((4, 48), float("nan"))}, "NaN or infinite"),
        (
            {"pixel_values": torch.zeros(12, 48), "image_grid_thw": torch.tensor([[1, 4, 4]])},
            "image_grid_thw describes 16 patches; pixel_values has 12 rows",
        ),
        ({"image_grid_thw": torch.tensor([[1, 0, 4]])}, r"image_grid_thw must lie in \[1, 64\]"),
        ({"mm_token_type_ids": torch.zeros(2, 5, dtype=torch.int64)}, r"mm_token_type_ids has shape \[2, 5\]"),
        ({"mm_token_type_ids": -torch.ones(2, 8, dtype=torch.int64)}, "must not be negative"),
    ],
)
def test_bad_vision_tensors_are_refused_naming_them(tensors: dict[str, torch.Tensor], message: str) -> None:
    with pytest.raises(InvalidTensors, match=message):
        validate_vision(tensors, sorted(tensors), RULES, torch.Size([2, 8]))


def test_good_vision_tensors_pass_unchanged() -> None:
    tensors = {"pixel_values": torch.randn(16, 48), "image_grid_thw": torch.tensor([[1, 4, 4]])}
    checked = validate_vision(tensors, sorted(tensors), RULES, torch.Size([1, 8]))
    assert all(checked[k] is tensors[k] for k in tensors)


# -- over HTTP ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["vispec", "msd"])
def test_undeclared_vision_keys_are_a_422_naming_them(vlm_server: ServerProcess, kind: str) -> None:
    session = _session(vlm_server.url, kind)
    body = {**_body(), "pixel_mask": torch.ones(1, 4, dtype=torch.int64), "labels": torch.zeros(2, 16).long()}
    resp = _generate(vlm_server.url, session, body)
    assert resp.status_code == 422
    assert "vision inputs ['labels', 'pixel_mask'] are not inputs of this model's" in resp.json()["error"]


def test_wrong_dtypes_and_oversize_vision_tensors_are_refused(vlm_server: ServerProcess) -> None:
    session = _session(vlm_server.url, "vispec")
    body = _body()
    resp = _generate(vlm_server.url, session, {**body, "pixel_values": body["pixel_values"].double()})
    assert resp.status_code == 422 and "pixel_values has dtype float64" in resp.json()["error"]
    resp = _generate(vlm_server.url, session, {**body, "image_grid_thw": body["image_grid_thw"].float()})
    assert resp.status_code == 422 and "image_grid_thw has dtype float32" in resp.json()["error"]
    huge = torch.zeros(1 << 20, 1)  # more patches than the server's token budget allows
    resp = _generate(vlm_server.url, session, {**body, "pixel_values": huge})
    assert resp.status_code == 422 and "pixel_values has 1048576 rows" in resp.json()["error"]
    wrong = {**body, "image_grid_thw": torch.tensor([[1, 2, 2]])}
    resp = _generate(vlm_server.url, session, wrong)
    assert resp.status_code == 422 and "describes 4 patches; pixel_values has 16 rows" in resp.json()["error"]


def test_vision_tensors_in_another_capture_are_refused(vlm_server: ServerProcess) -> None:
    resp = httpx.post(vlm_server.url + "/session", json={"client": "t", "capture": {"kind": "dflash", "layers": [1]}})
    session = resp.json()["session_id"]
    resp = _generate(vlm_server.url, session, _body())
    assert resp.status_code == 422
    assert "unexpected keys ['image_grid_thw', 'mm_token_type_ids', 'pixel_values']" in resp.json()["error"]


@pytest.mark.parametrize("kind", ["vispec", "msd"])
def test_a_text_only_server_refuses_the_capture_at_session(server: ServerProcess, kind: str) -> None:
    resp = httpx.post(server.url + "/session", json={"client": "t", "capture": {"kind": kind}}, trust_env=False)
    assert resp.status_code == 422
    assert f"cannot serve the {kind} capture" in resp.json()["error"]
    assert "is not a vision-language model: its config has no image_token_id" in resp.json()["error"]


def test_the_client_raises_before_sending_to_a_text_only_server(server: ServerProcess) -> None:
    ids, attention, loss, _ = vlm_batch(2, images=0)
    with RemoteVispecTargetModel.from_urls([server.url], max_retries=0) as remote:
        with pytest.raises(TargetHTTPError, match="is not a vision-language model") as info:
            remote.generate_batch(ids, attention, loss)
    assert info.value.status == 422
    with RemoteMSDTargetModel.from_urls([server.url], max_retries=0) as remote:
        with pytest.raises(TargetHTTPError, match="is not a vision-language model"):
            remote.generate_batch(loss_mask=loss, model_inputs={"input_ids": ids, "attention_mask": attention})
        with pytest.raises(ValueError, match="MSD requires attention_mask"):
            remote.generate_batch(loss_mask=loss, model_inputs={"input_ids": ids})


def _session_against(handler: object, paths: list[str]) -> ServerSession:
    def record(request: httpx.Request) -> httpx.Response:
        paths.append(request.url.path)
        return handler(request)  # type: ignore[operator]

    control = ControlPlane("http://other:8001", transport=httpx.MockTransport(record))
    return ServerSession(control, "t", capture=Capture.vispec())


def test_an_upstream_or_older_server_is_refused_before_anything_is_sent() -> None:
    paths: list[str] = []

    def upstream(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/session":
            return httpx.Response(404, json={"error": "not found"})
        return httpx.Response(200, json={"status": "ok"})

    session = _session_against(upstream, paths)
    with pytest.raises(CaptureUnsupported, match="upstream EAGLE-3 server .* vispec capture"):
        session.join(rejoin=False)
    session.close()

    def no_token(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/session":
            capture = {"kind": "vispec", "layers": [], "logits": False}
            return httpx.Response(200, json={"session_id": "a", "encoding": "probs", "capture": capture})
        return httpx.Response(200, json={"status": "ok"})

    session = _session_against(no_token, paths)
    with pytest.raises(CaptureUnsupported, match="without naming its model's image token id"):
        session.join(rejoin=False)
    session.close()
    assert "/generate" not in paths


def test_loading_picks_the_image_text_to_text_class(tmp_path: Path, model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    from eagle3_appliance.model.checkpoint import model_class

    assert model_class(make_tiny_vlm(tmp_path / "vlm")) is AutoModelForImageTextToText
    assert model_class(model_dir) is AutoModelForCausalLM


def test_a_vlm_requests_memory_counts_every_hidden_state_the_forward_keeps() -> None:
    """ViSpec and MSD run the model with ``output_hidden_states=True``: the embedding output and
    every layer's output stay alive until the answer is built, ``(L + 1) x H`` a token beside the
    unsliced forward and the answer. A bound without them let a request pass the memory budget
    by that much (for an 8B target with a 152k vocabulary, about half the real peak)."""
    from eagle3_appliance.model.capture import answer_bytes_per_token, working_bytes_per_token
    from eagle3_appliance.model.limits import TargetShape

    shape = TargetShape(
        32768, vocab_size=151936, hidden_size=4096, intermediate_size=12288, dtype_bytes=2, num_layers=36
    )
    kept = (36 + 1) * 4096 * 2
    for capture in (Capture.vispec(), Capture.msd()):
        unsliced_and_answer = shape.unsliced_bytes_per_token() + answer_bytes_per_token(shape, capture)
        assert working_bytes_per_token(shape, capture) == unsliced_and_answer + kept
