"""The ViSpec and MSD captures: negotiated per session, vision inputs checked by name, dtype and size.

Over real HTTP: a tiny Qwen2-VL appliance (random weights, ``tests/vlm_support.py``) and the
built-in text-only one. The bit-for-bit comparison with upstream's wrappers is
``tests/integration/test_vlm_target.py``.
"""

from __future__ import annotations

import dataclasses
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
    patch_dim=48,
    merge=2,
)


@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        ({"pixel_values": torch.zeros(16, 48), "image_sizes": torch.ones(1, 2)}, r"\['image_sizes'\] are not inputs"),
        ({"pixel_values": torch.zeros(16, 48, dtype=torch.float64)}, "pixel_values has dtype float64"),
        ({"image_grid_thw": torch.ones(1, 3)}, "image_grid_thw has dtype float32; expected one of int64, int32"),
        ({"pixel_values": torch.zeros(65, 48)}, "pixel_values has 65 rows; this request may carry at most 64"),
        ({"pixel_values": torch.full((4, 48), float("nan"))}, "NaN or infinite"),
        (
            {"pixel_values": torch.zeros(12, 48), "image_grid_thw": torch.tensor([[1, 4, 4]])},
            "image_grid_thw describes 16 patches; pixel_values has 12 rows",
        ),
        ({"image_grid_thw": torch.tensor([[1, 0, 4]])}, r"image_grid_thw must lie in \[1, 64\]"),
        ({"mm_token_type_ids": torch.zeros(2, 5, dtype=torch.int64)}, r"mm_token_type_ids has shape \[2, 5\]"),
        ({"mm_token_type_ids": -torch.ones(2, 8, dtype=torch.int64)}, "must not be negative"),
        # What the vision tower would fail on (a 500 before): the patch size, the merge, the pairing.
        (
            {"pixel_values": torch.zeros(16, 47), "image_grid_thw": torch.tensor([[1, 4, 4]])},
            r"pixel_values must be \[patches, 48\]",
        ),
        (
            {"pixel_values": torch.zeros(1, 16, 48), "image_grid_thw": torch.tensor([[1, 4, 4]])},
            r"pixel_values must be \[patches, 48\]",
        ),
        (
            {"pixel_values": torch.zeros(9, 48), "image_grid_thw": torch.tensor([[1, 3, 3]])},
            "image_grid_thw's height and width must be multiples of the vision tower's merge size 2",
        ),
        ({"pixel_values": torch.zeros(16, 48)}, "pixel_values comes without image_grid_thw"),
        ({"mm_token_type_ids": torch.full((2, 8), 7)}, r"mm_token_type_ids must lie in \[0, 2\]"),
    ],
)
def test_bad_vision_tensors_are_refused_naming_them(tensors: dict[str, torch.Tensor], message: str) -> None:
    with pytest.raises(InvalidTensors, match=message):
        validate_vision(tensors, sorted(tensors), RULES, torch.zeros(2, 8, dtype=torch.int64))


def test_pixel_rows_match_the_placeholders_they_fill() -> None:
    """Each placeholder token takes ``merge ** 2`` patches (the model refuses any other count, after
    its vision tower ran), so a request's pixel rows are its own placeholders' and not merely within
    the server's token budget; one image's patches at most a row's length (its placeholders lie in
    one row)."""
    rules = VisionRules(
        "Qwen2VLModel.forward",
        frozenset({"pixel_values", "image_grid_thw"}),
        (torch.float32,),
        max_patches=1 << 20,
        patch_dim=48,
        merge=2,
        placeholders={"pixel_values": IMAGE_TOKEN},
    )
    ids = torch.zeros(2, 8, dtype=torch.int64)
    ids[0, 1:5] = IMAGE_TOKEN
    fits = {"pixel_values": torch.zeros(16, 48), "image_grid_thw": torch.tensor([[1, 4, 4]])}
    assert validate_vision(fits, sorted(fits), rules, ids)["pixel_values"] is fits["pixel_values"]
    more = {"pixel_values": torch.zeros(20, 48), "image_grid_thw": torch.tensor([[1, 2, 10]])}
    with pytest.raises(InvalidTensors, match=r"has 20 rows; the request's 4 placeholder tokens \(id 250\) take 16"):
        validate_vision(more, sorted(more), rules, ids)
    fewer = {"pixel_values": torch.zeros(12, 48), "image_grid_thw": torch.tensor([[1, 2, 6]])}
    with pytest.raises(InvalidTensors, match=r"has 12 rows; the request's 4 placeholder tokens \(id 250\) take 16"):
        validate_vision(fewer, sorted(fewer), rules, ids)
    ids[:, :] = IMAGE_TOKEN  # 16 placeholders, but one image of 64 patches cannot lie in a row of 8 tokens
    wide = {"pixel_values": torch.zeros(64, 48), "image_grid_thw": torch.tensor([[1, 8, 8]])}
    with pytest.raises(InvalidTensors, match="an image of 64 patches; .* row of 8 tokens, 32 patches at most"):
        validate_vision(wide, sorted(wide), rules, ids)


def test_an_eager_vision_towers_attention_scores_are_bounded_by_the_working_memory() -> None:
    """Eager attention holds ``heads x P x P`` float32 scores a frame of P patches: 2 heads x 16^2 x 4 B
    = 2 KiB an image of 4x4 patches. A budget below that refuses the image; SDPA is not bounded."""
    eager = VisionRules(
        "Qwen2VLModel.forward",
        frozenset({"pixel_values", "image_grid_thw"}),
        (torch.float32,),
        max_patches=64,
        patch_dim=48,
        merge=2,
        eager_heads=2,
        attention_budget=2047,
    )
    image = {"pixel_values": torch.zeros(16, 48), "image_grid_thw": torch.tensor([[1, 4, 4]])}
    ids = torch.zeros(1, 8, dtype=torch.int64)
    with pytest.raises(InvalidTensors, match="eager attention for 2,048 bytes of scores, above this request's 2,047"):
        validate_vision(image, sorted(image), eager, ids)
    roomy = dataclasses.replace(eager, attention_budget=2048)
    assert validate_vision(image, sorted(image), roomy, ids)["pixel_values"] is image["pixel_values"]
    sdpa = dataclasses.replace(eager, eager_heads=None, attention_budget=None)
    assert validate_vision(image, sorted(image), sdpa, ids)["pixel_values"] is image["pixel_values"]


def test_qwen2_5_vl_seconds_per_video_grid_are_floating() -> None:
    """``second_per_grid_ts`` is a float a video (Qwen2.5-VL's processor): taken, and checked."""
    rules = VisionRules(
        "Qwen2_5_VLModel.forward", frozenset({"video_grid_thw", "second_per_grid_ts"}), (torch.float32,), 64
    )
    grid = torch.tensor([[2, 4, 4]])
    ok = {"video_grid_thw": grid, "second_per_grid_ts": torch.tensor([0.5])}
    with pytest.raises(InvalidTensors, match="pixel_values_videos has None rows"):  # the dtype passed
        validate_vision(ok, sorted(ok), rules, torch.zeros(1, 8, dtype=torch.int64))
    for bad, message in [
        (torch.tensor([float("nan")]), "one finite, non-negative value a video"),
        (torch.tensor([[0.5]]), "one finite, non-negative value a video"),
        (torch.tensor([0.5, 0.5]), "second_per_grid_ts has 2 values; video_grid_thw has 1 videos"),
        (torch.tensor([1], dtype=torch.int64), "second_per_grid_ts has dtype int64"),
    ]:
        tensors = {"video_grid_thw": grid, "second_per_grid_ts": bad}
        with pytest.raises(InvalidTensors, match=message):
            validate_vision(tensors, sorted(tensors), rules, torch.zeros(1, 8, dtype=torch.int64))


def test_good_vision_tensors_pass_unchanged() -> None:
    tensors = {"pixel_values": torch.randn(16, 48), "image_grid_thw": torch.tensor([[1, 4, 4]])}
    checked = validate_vision(tensors, sorted(tensors), RULES, torch.zeros(1, 8, dtype=torch.int64))
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
    huge = torch.zeros(1 << 20, 1)  # more patches than the request's 4 placeholders take
    resp = _generate(vlm_server.url, session, {**body, "pixel_values": huge})
    assert resp.status_code == 422
    assert "pixel_values has 1048576 rows; the request's 4 placeholder tokens (id 250) take 16" in resp.json()["error"]
    wrong = {**body, "image_grid_thw": torch.tensor([[1, 2, 2]])}
    resp = _generate(vlm_server.url, session, wrong)
    assert resp.status_code == 422 and "describes 4 patches; pixel_values has 16 rows" in resp.json()["error"]


HOSTILE = {
    "patch of 47 values": {"pixel_values": torch.randn(16, 47)},
    "3-D pixels": {"pixel_values": torch.randn(1, 16, 48)},
    "odd grid": {"pixel_values": torch.randn(9, 48), "image_grid_thw": torch.tensor([[1, 3, 3]])},
    "token type 7": {"mm_token_type_ids": torch.full((2, 16), 7)},
    "pixels without a grid": {"image_grid_thw": None},
    "a grid without pixels": {"pixel_values": None},
    "more features than placeholders": {
        "pixel_values": torch.randn(64, 48),
        "image_grid_thw": torch.tensor([[1, 8, 8]]),
    },
    "two grids for one image": {"pixel_values": torch.randn(32, 48), "image_grid_thw": torch.tensor([[1, 4, 4]] * 2)},
    "a video without placeholders": {
        "pixel_values_videos": torch.randn(16, 48),
        "video_grid_thw": torch.tensor([[1, 4, 4]]),
    },
}


@pytest.mark.parametrize(
    "capture", [{"kind": "vispec"}, {"kind": "msd"}, {"kind": "dspark", "layers": [-1, 3]}], ids=lambda c: c["kind"]
)
def test_hostile_vision_tensors_are_a_422_and_the_server_goes_on(vlm_server: ServerProcess, capture: dict) -> None:
    """Vision tensors the model's own code would crash on (a reshape, a dict lookup, a missing
    grid): each is the request's fault, a 422 naming it, never a 500 that takes the server out of
    a fleet; health and the next good request are answered."""
    resp = httpx.post(vlm_server.url + "/session", json={"client": "t", "capture": capture}, trust_env=False)
    assert resp.status_code == 200, resp.text
    session = resp.json()["session_id"]
    for name, change in HOSTILE.items():
        body = {k: v for k, v in {**_body(), **change}.items() if v is not None}
        resp = _generate(vlm_server.url, session, body)
        assert resp.status_code == 422, (name, resp.status_code, resp.text)
        assert resp.json()["error"], name
    assert httpx.get(vlm_server.url + "/health", trust_env=False).status_code == 200
    resp = _generate(vlm_server.url, session, _body())
    assert resp.status_code == 200, resp.text


def test_a_shallow_model_started_without_aux_layer_ids_serves_all_but_eagle3(vlm_server: ServerProcess) -> None:
    """Four layers are too few for EAGLE-3's default aux ids [1, L//2-1, L-4]. The server starts
    anyway (no family-specific flags needed for DSpark, ViSpec, MSD or DFlash) and refuses an
    EAGLE-3 client, ours at /session or upstream's at /set_vocab_mapping and /generate, with a 422
    saying to pass --aux-layer-ids; it never answers with other layers."""
    url = vlm_server.url
    assert httpx.get(url + "/model_info", trust_env=False).json()["aux_layer_ids"] == []
    resp = httpx.post(url + "/session", json={"client": "t"}, trust_env=False)
    assert resp.status_code == 422
    assert "cannot serve the eagle3 capture" in resp.json()["error"] and "--aux-layer-ids" in resp.json()["error"]
    mask = torch.zeros(256, dtype=torch.bool)
    mask[:32] = True
    mapping = {"selected_token_ids": torch.arange(32), "selected_token_mask": mask}
    resp = httpx.post(url + "/set_vocab_mapping", content=wire.encode(mapping), trust_env=False)
    assert resp.status_code == 422 and "--aux-layer-ids" in resp.json()["error"]
    ids, attention, loss, _ = vlm_batch(3, images=0)
    resp = httpx.post(
        url + "/generate",
        content=wire.encode({"input_ids": ids, "attention_mask": attention, "loss_mask": loss}),
        trust_env=False,
    )
    assert resp.status_code == 422 and "--aux-layer-ids" in resp.json()["error"]
    _session(url, "vispec")  # the other captures are served by the same server


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
