"""The DFlash capture over real HTTP: negotiated per session, checked, bounded, counted.

Values are checked against transformers' own ``output_hidden_states`` (entry ``i + 1`` is
the output of decoder layer ``i``, for every layer but the last, whose entry is taken after the
final norm) and the model's own logits, computed here in-process; the comparison with
upstream's ``HFDFlashTargetModel`` is ``tests/integration/test_dflash_target.py``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from eagle3_appliance.launch import ServerProcess
from eagle3_client import CapabilityUnavailable, CaptureUnsupported, RemoteDFlashTargetModel, TargetHTTPError, protocol
from eagle3_client.capture import Capture
from eagle3_client.dflash import dflash_batch_type
from eagle3_client.synthetic import packed_batch, random_batch
from eagle3_client.transports.control import ControlPlane
from tests.ops_support import metric, scrape

VOCAB = 1024


@pytest.fixture(scope="module")
def hf_model(model_dir: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).requires_grad_(False)


@pytest.fixture(scope="module")
def limited(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server whose token budget is small enough to reach with one request (the whole logits at once:
    with slices a capture's answer is always within its memory budget, so the answer limit is reached
    only here)."""
    log = tmp_path_factory.mktemp("logs") / "limited.log"
    args = ["--cache-dir", str(cache_dir), "--max-batch-tokens", "100", "--logits-slice-mib", "0"]
    with ServerProcess(args, log_path=log) as proc:
        yield proc


def test_the_answer_is_the_models_layer_outputs_and_logits(server: ServerProcess, hf_model: torch.nn.Module) -> None:
    layers = [5, 0, 2]  # any order, as the recipe lists them
    inputs = random_batch(VOCAB, 2, 24, seed=11, pad=True)
    with RemoteDFlashTargetModel.from_urls(
        [server.url], target_layer_ids=layers, capture_logits=True, data_plane="wire"
    ) as remote:
        batch = remote.generate_batch(*inputs)
    with torch.no_grad():
        out = hf_model(input_ids=inputs[0], attention_mask=inputs[1], output_hidden_states=True, use_cache=False)
    expected = torch.cat([out.hidden_states[i + 1] for i in layers], dim=-1)
    assert type(batch) is dflash_batch_type()
    assert batch.hidden_states.dtype == expected.dtype and torch.equal(batch.hidden_states, expected)
    assert torch.equal(batch.logits, out.logits)
    assert torch.equal(batch.input_ids, inputs[0]) and torch.equal(batch.loss_mask, inputs[2])
    assert (batch.position_ids, batch.seq_lens, batch.doc_remaining) == (None, None, None)


def test_without_logits_only_the_layers_travel(server: ServerProcess, hf_model: torch.nn.Module) -> None:
    inputs = random_batch(VOCAB, 1, 16, seed=12)
    with RemoteDFlashTargetModel.from_urls([server.url], target_layer_ids=[3]) as remote:
        batch = remote.generate_batch(*inputs)
        received = remote.transport_stats()[0]["bytes"]
    with torch.no_grad():
        out = hf_model(input_ids=inputs[0], attention_mask=inputs[1], output_hidden_states=True, use_cache=False)
    assert batch.logits is None and torch.equal(batch.hidden_states, out.hidden_states[4])
    assert sum(received.values()) < 16 * 64 * 4 + 1024  # one layer of float32 and the wire headers


@pytest.mark.parametrize(
    ("capture", "message"),
    [
        ({"kind": "dflash", "layers": [1, 8]}, "layer id 8 is out of range for a model with 8 layers"),
        ({"kind": "dflash", "layers": [-1]}, "layer id -1 is out of range"),
        ({"kind": "dflash", "layers": [2, 4, 2]}, r"layer id\(s\) \[2\] more than once"),
        ({"kind": "dflash", "layers": []}, "at least one decoder layer"),
        ({"kind": "dflash", "layers": [1, True]}, "capture.layers must be a list of integers"),
        ({"kind": "dflash", "layers": [1], "logits": "yes"}, "capture.logits must be true or false"),
        ({"kind": "medusa", "layers": [1]}, "capture.kind must be one of"),
        ({"kind": "eagle3", "layers": [1, 2, 3]}, "an eagle3 capture takes no layers"),
        ({"kind": "dflash", "layers": list(range(2000))}, "at most 1024"),
        ([1, 2], "capture must be a JSON object"),
    ],
)
def test_a_bad_capture_is_a_422_naming_it(server: ServerProcess, capture: object, message: str) -> None:
    resp = httpx.post(server.url + "/session", json={"client": "t", "capture": capture}, trust_env=False)
    assert resp.status_code == 422
    assert re.search(message, resp.json()["error"]), resp.text


def test_the_client_reports_the_servers_refusal(server: ServerProcess) -> None:
    with RemoteDFlashTargetModel.from_urls([server.url], target_layer_ids=[0, 0], max_retries=0) as remote:
        with pytest.raises(TargetHTTPError, match="more than once") as info:
            remote.generate_batch(*random_batch(VOCAB, 1, 8, seed=1))
    assert info.value.status == 422


def test_requests_past_the_servers_memory_or_answer_limit_are_422s_and_compute_nothing(
    limited: ServerProcess,
) -> None:
    every_layer = list(range(8))  # 5 captures beyond EAGLE-3's three shrink the 100-token budget to 87
    with RemoteDFlashTargetModel.from_urls([limited.url], target_layer_ids=every_layer, capture_logits=True) as remote:
        before = metric(scrape(limited.url), "eagle3_inference_exec_count_total")
        with pytest.raises(TargetHTTPError, match="at most 87 tokens per request") as memory:
            remote.generate_batch(*random_batch(VOCAB, 1, 100, seed=2))
        # 80 x (8 x 64 + 1024) float32 = 491,520 bytes: more than the largest EAGLE-3 answer (100 probs tokens).
        with pytest.raises(TargetHTTPError, match="would be 491,520 bytes, above .* 488,100 bytes") as answer:
            remote.generate_batch(*random_batch(VOCAB, 1, 80, seed=2))
        assert memory.value.status == answer.value.status == 422
        assert metric(scrape(limited.url), "eagle3_inference_exec_count_total") == before
        assert remote.generate_batch(*random_batch(VOCAB, 1, 79, seed=2)).hidden_states.shape == (1, 79, 512)


def test_the_capture_is_counted_by_kind(limited: ServerProcess) -> None:
    inputs = random_batch(VOCAB, 2, 10, seed=3)
    before = scrape(limited.url)
    with RemoteDFlashTargetModel.from_urls(
        [limited.url], target_layer_ids=[1, 2], capture_logits=True, data_plane="wire"
    ) as remote:
        remote.generate_batch(*inputs)
        remote.generate_batch(*inputs)
    after = scrape(limited.url)
    name = "eagle3_generate_captures_total"
    assert metric(after, name, capture="dflash+logits") - metric(before, name, capture="dflash+logits") == 2
    sent = metric(after, "eagle3_response_bytes_total", data_plane="wire", encoding="dflash+logits")
    assert sent - metric(before, "eagle3_response_bytes_total", data_plane="wire", encoding="dflash+logits") > 2 * (
        20 * (2 * 64 + VOCAB) * 4
    )


def test_eagle3_offers_and_replies_are_unchanged_on_the_wire() -> None:
    offer = protocol.SessionOffer(client="c")
    assert "capture" not in offer.to_json()
    assert protocol.SessionOffer.from_json(offer.to_json()).capture.is_eagle3
    assert "capture" not in protocol.SessionReply(session_id="s").to_json()
    dflash = Capture.dflash([4, 1], logits=True)
    body = protocol.SessionOffer(client="c", capture=dflash).to_json()
    assert body["capture"] == {"kind": "dflash", "layers": [4, 1], "logits": True}
    assert protocol.SessionReply.from_json({"session_id": "s", "capture": body["capture"]}).capture == dflash


def test_an_appliance_that_ignores_the_capture_is_refused(server: ServerProcess) -> None:
    """A server that answers /session but does not echo the capture would send EAGLE-3 supervision."""

    def old_server(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/session":
            return httpx.Response(200, json={"session_id": "abc", "encoding": "probs", "data_planes": ["wire"]})
        return httpx.Response(200, json={"status": "ok"})

    from eagle3_client.remote.session import ServerSession
    from eagle3_client.transports.control import ControlPlane

    control = ControlPlane("http://old:8001", transport=httpx.MockTransport(old_server))
    session = ServerSession(control, "t", capture=Capture.dflash([1, 2]))
    with pytest.raises(CaptureUnsupported, match="did not agree to the dflash capture"):
        session.join(rejoin=False)
    session.close()


def test_eagle3_and_dflash_clients_share_one_server(server: ServerProcess, hf_model: torch.nn.Module) -> None:
    from eagle3_client import RemoteEagle3TargetModel
    from eagle3_client.synthetic import vocab_mapping

    inputs = random_batch(VOCAB, 2, 12, seed=21, pad=True)
    with (
        RemoteEagle3TargetModel.from_urls([server.url]) as eagle,
        RemoteDFlashTargetModel.from_urls([server.url], target_layer_ids=[1, 3, 4]) as dflash,
    ):
        eagle.set_vocab_mapping(*vocab_mapping(VOCAB, 128, seed=2))
        e = eagle.generate_batch(*inputs)
        d = dflash.generate_batch(*inputs)
    # The same layers, the same forward: EAGLE-3's aux states (layers 1, 3, 4) unshifted are DFlash's.
    assert torch.equal(e.aux_hidden_states, d.hidden_states)


def test_the_sizes_command_counts_a_captures_bytes_as_served(server: ServerProcess, model_dir: Path) -> None:
    from typer.testing import CliRunner

    from eagle3_appliance.cli import app
    from eagle3_appliance.sizes import capture_rows, load_shape

    (row,) = capture_rows(load_shape(str(model_dir)), captures=["dflash+logits:1,6"], dtype_bytes=4, batch_tokens=1)
    inputs = random_batch(VOCAB, 2, 9, seed=4)
    with RemoteDFlashTargetModel.from_urls([server.url], target_layer_ids=[1, 6], capture_logits=True) as remote:
        batch = remote.generate_batch(*inputs)
    served = batch.hidden_states.numel() * 4 + batch.logits.numel() * 4
    assert row.bytes_per_token * 18 == served == 18 * (2 * 64 + VOCAB) * 4
    runner = CliRunner()
    result = runner.invoke(app, ["sizes", "--model", "qwen3-8b", "--capture", "dflash:1,9,17,25,33", "--markdown"])
    assert result.exit_code == 0, result.output
    assert "| qwen3-8b | dflash:1,9,17,25,33 | 40,960 | 80.0 MiB | 26.3 % | yes |" in result.output
    assert "fetches the whole LM head once, in chunks: 1,244,659,712 B" in result.output
    bad = runner.invoke(app, ["sizes", "--model", "qwen3-8b", "--capture", "dflash:1,36"], env={"COLUMNS": "300"})
    assert bad.exit_code == 2 and "layer id 36 is out of range for a model with 36 layers" in bad.output, bad.output


def test_a_half_packed_batch_is_refused_before_anything_is_sent() -> None:
    remote = RemoteDFlashTargetModel.from_urls(["http://127.0.0.1:9"], target_layer_ids=[1])  # nothing listens
    ids = torch.zeros(1, 8, dtype=torch.long)
    with pytest.raises(ValueError, match=r"packed rows need all of .*\['position_ids', 'doc_remaining'\] missing"):
        remote.generate_batch(ids, torch.ones_like(ids), torch.ones_like(ids), seq_lens=torch.tensor([[4, 4]]))
    remote.close()


def test_packed_rows_are_the_documents_run_one_by_one(server: ServerProcess, hf_model: torch.nn.Module) -> None:
    """Each document of a packed row gets the layer outputs and logits it gets alone (positions from 0),
    up to kernel rounding: a leak across documents would be of the order of the values themselves."""
    rows = [[5, 9, 2], [16]]
    batch = packed_batch(VOCAB, rows, 16, seed=21)
    layers = [6, 1]
    with RemoteDFlashTargetModel.from_urls([server.url], target_layer_ids=layers, capture_logits=True) as remote:
        got = remote.generate_batch(**batch)
    for key in ("position_ids", "seq_lens", "doc_remaining", "attention_mask", "loss_mask"):
        assert torch.equal(getattr(got, key), batch[key]), key
    for r, docs in enumerate(rows):
        start = 0
        for n in docs:
            ids = batch["input_ids"][r : r + 1, start : start + n]
            with torch.no_grad():
                out = hf_model(input_ids=ids, output_hidden_states=True, use_cache=False)
            alone = torch.cat([out.hidden_states[i + 1] for i in layers], dim=-1)[0]
            torch.testing.assert_close(got.hidden_states[r, start : start + n], alone, rtol=1e-3, atol=1e-4)
            torch.testing.assert_close(got.logits[r, start : start + n], out.logits[0], rtol=1e-3, atol=1e-4)
            start += n


def test_an_appliance_that_does_not_grant_packing_is_never_sent_a_packed_batch() -> None:
    """A DFlash appliance from before packing echoes the capture but grants no capabilities."""
    sent: list[str] = []
    capture = Capture.dflash([1])

    def older(request: httpx.Request) -> httpx.Response:
        sent.append(request.url.path)
        if request.url.path == "/session":
            return httpx.Response(200, json=protocol.SessionReply(session_id="s1", capture=capture).to_json())
        return httpx.Response(200, json={"status": "ok"})

    remote = RemoteDFlashTargetModel.from_urls(["http://older:8001"], target_layer_ids=[1], max_retries=0)
    remote._servers[0].control = ControlPlane("http://older:8001", max_retries=0, transport=httpx.MockTransport(older))
    try:
        with pytest.raises(CapabilityUnavailable, match="http://older:8001 cannot serve 'packing'.*does not grant it"):
            remote.generate_batch(**packed_batch(VOCAB, [[4, 4]], 8, seed=6))
        assert "/generate" not in sent and "/session" in sent
    finally:
        remote.close()
