"""A wire answer that leaves while later slices are computed (capability ``streamed-answer``, issue #34 item 4).

Over a real server with 1 MiB LM-head slices (85 positions of the built-in model's logits) whose
slices the test can hold or fail (``tests/held_slices.py``): streamed bodies are byte for byte
the whole-answer path's and the oracle's, padded and packed; an upstream client is answered as
before; the first rows leave while a later slice is held; a failure after the head went out
cuts the body short, and our client's retry gets the right answer.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from eagle3_appliance.core.inputs import GenerateInputs, Packing, VocabMapping
from eagle3_appliance.launch import ServerProcess
from eagle3_appliance.model import supervision
from eagle3_appliance.model.loading import load_target
from eagle3_appliance.model.supervision import in_process
from eagle3_appliance.settings import Settings
from eagle3_client import RemoteEagle3TargetModel, protocol, wire
from eagle3_client.encodings import PROBS
from eagle3_client.synthetic import packed_batch, random_batch, vocab_mapping
from tests.oracle import Oracle, assert_bit_exact

HOLD_SEQ_LEN = 300  # 4 slices a row; slice 1 waits for the test's release file
FAIL_SEQ_LEN = 301  # the first such forward fails in slice 2
ALWAYS_FAIL_SEQ_LEN = 302  # every such forward fails in slice 2
HOOK = str(Path(__file__).with_name("held_slices.py"))
STREAMED = (protocol.CAPABILITY_PACKING, protocol.CAPABILITY_STREAMED_ANSWER)
WHOLE = (protocol.CAPABILITY_PACKING,)


@pytest.fixture(scope="module")
def hooks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hooks")


@pytest.fixture(scope="module")
def server(model_dir: Path, hooks: Path) -> Iterator[ServerProcess]:
    env = {
        "EAGLE3_TEST_HOLD_SEQ_LEN": str(HOLD_SEQ_LEN),
        "EAGLE3_TEST_RELEASE": str(hooks / "release"),
        "EAGLE3_TEST_FAIL_SEQ_LEN": str(FAIL_SEQ_LEN),
        "EAGLE3_TEST_FAILED": str(hooks / "failed"),
        "EAGLE3_TEST_ALWAYS_FAIL_SEQ_LEN": str(ALWAYS_FAIL_SEQ_LEN),
    }
    args = ["--model", str(model_dir), "--logits-slice-mib", "1"]
    with ServerProcess(args, log_path=hooks / "server.log", env=env, launcher=(sys.executable, HOOK)) as proc:
        yield proc


@pytest.fixture(scope="module")
def mapping(oracle: Oracle) -> tuple[torch.Tensor, torch.Tensor]:
    return vocab_mapping(oracle.vocab_size, 512, seed=7)


class Session:
    """A raw session on ``server`` that offered ``capabilities``, with the draft vocabulary set."""

    def __init__(self, http: httpx.Client, capabilities: tuple[str, ...], mapping: tuple[torch.Tensor, ...]) -> None:
        offer = protocol.SessionOffer(client="streamed-test", capabilities=capabilities)
        reply = protocol.SessionReply.from_json(http.post("/session", json=offer.to_json()).json())
        assert reply.capabilities == capabilities  # our server grants both
        self.http = http
        self.headers = {protocol.SESSION_HEADER: reply.session_id}
        body = wire.encode(dict(zip(protocol.VOCAB_MAPPING_KEYS, mapping, strict=True)))
        assert http.post("/set_vocab_mapping", content=body, headers=self.headers).status_code == 200

    def generate(self, tensors: dict[str, torch.Tensor]) -> bytes:
        response = self.http.post("/generate", content=wire.encode(tensors), headers=self.headers)
        assert response.status_code == 200, response.text
        return response.content


def _inputs(oracle: Oracle, batch: int, seq_len: int, seed: int) -> dict[str, torch.Tensor]:
    return dict(
        zip(protocol.GENERATE_INPUT_KEYS, random_batch(oracle.vocab_size, batch, seq_len, seed=seed), strict=True)
    )


def test_streamed_bodies_are_the_whole_answers_bytes_and_the_oracles(
    server: ServerProcess, oracle: Oracle, mapping: tuple[torch.Tensor, torch.Tensor], hooks: Path, model_dir: Path
) -> None:
    """Padded (1 to 3 slices a row) and packed rows: the same bytes with and without the capability."""
    (hooks / "release").touch()  # nothing is held here
    with httpx.Client(base_url=server.url, timeout=120, trust_env=False) as http:
        streamed, whole = Session(http, STREAMED, mapping), Session(http, WHOLE, mapping)
        for seed, (batch, seq_len) in enumerate([(2, 203), (1, 40), (3, 120)]):  # padded rows; 1 to 3 slices
            tensors = _inputs(oracle, batch, seq_len, seed)
            body = streamed.generate(tensors)
            assert body == whole.generate(tensors)
            assert_bit_exact(wire.decode(body), oracle.supervision(*tensors.values(), *mapping))
        packed = packed_batch(oracle.vocab_size, [[90, 70, 40], [150, 31]], 200, seed=4)
        body = streamed.generate(packed)
        assert body == whole.generate(packed)
        packing = Packing(packed["position_ids"], packed["seq_lens"], packed["doc_remaining"])
        inputs = GenerateInputs(packed["input_ids"], packed["attention_mask"], packed["loss_mask"], packing)
        target = load_target(Settings(model=str(model_dir)))
        assert_bit_exact(wire.decode(body), in_process(target, inputs, VocabMapping(*mapping)))


def test_the_first_rows_leave_while_a_later_slice_is_held(
    server: ServerProcess, oracle: Oracle, mapping: tuple[torch.Tensor, torch.Tensor], hooks: Path
) -> None:
    """Slice 1 of a 300-position forward waits for a file only this test creates, after it has read
    the head, ``aux_hidden_states`` and the first 84 rows of ``target_probs`` (slice 0's). An upstream
    client's (anonymous, no capability) answer to the same request is the same bytes, sent whole."""
    release = hooks / "release"
    release.unlink(missing_ok=True)
    tensors = _inputs(oracle, 1, HOLD_SEQ_LEN, seed=11)
    draft = mapping[0].numel()
    # What a client holds before any later slice can exist: everything up to slice 0's rows.
    head = {
        "aux_hidden_states": torch.empty(
            (1, HOLD_SEQ_LEN, oracle.model.config.hidden_size * len(oracle.aux_layer_ids)), device="meta"
        ),
        "target_probs": torch.empty((1, 84, draft), device="meta"),
    }
    early = wire.encoded_size(head)
    with httpx.Client(base_url=server.url, timeout=120, trust_env=False) as http:
        session = Session(http, STREAMED, mapping)
        received = bytearray()
        with http.stream("POST", "/generate", content=wire.encode(tensors), headers=session.headers) as response:
            assert response.status_code == 200
            chunks = response.iter_raw()
            while len(received) < early:
                received += next(chunks)
            assert not release.exists()  # slice 1 is still held: these bytes left before the computation ended
            release.touch()
            for chunk in chunks:
                received += chunk
        assert int(response.headers["content-length"]) == len(received)
        expected = oracle.supervision(*tensors.values(), *mapping)
        assert_bit_exact(wire.decode(bytes(received)), expected)
        # Upstream's client: no session, no capability.
        anonymous = wire.encode(dict(zip(protocol.VOCAB_MAPPING_KEYS, mapping, strict=True)))
        assert http.post("/set_vocab_mapping", content=anonymous).status_code == 200
        upstream = http.post("/generate", content=wire.encode(tensors))
        assert upstream.status_code == 200 and upstream.content == bytes(received)
        assert protocol.ENCODING_HEADER not in upstream.headers


def test_a_failure_after_the_head_cuts_the_body_and_the_client_retries(
    server: ServerProcess, oracle: Oracle, mapping: tuple[torch.Tensor, torch.Tensor], hooks: Path
) -> None:
    """Slice 2 of the first 301-position forward raises after rows went out: the raw body is short
    (never a complete wrong answer), and our client's retry (same request id) gets the oracle's bits."""
    (hooks / "release").touch()
    failed = hooks / "failed"
    tensors = _inputs(oracle, 1, FAIL_SEQ_LEN, seed=12)
    with RemoteEagle3TargetModel.from_urls([server.url], device="cpu", timeout=120) as remote:
        remote.set_vocab_mapping(*mapping)
        got = remote.generate_batch(*tensors.values())
    assert failed.exists()  # the failure did happen mid-stream
    assert_bit_exact(got, oracle.supervision(*tensors.values(), *mapping))


def test_a_computation_that_keeps_failing_is_a_short_body(
    server: ServerProcess, oracle: Oracle, mapping: tuple[torch.Tensor, torch.Tensor], hooks: Path
) -> None:
    """Every 302-position forward fails in slice 2: a raw client gets a body shorter than its
    Content-Length, a transport error (which our client retries, and reports once its retries
    are spent: ``eagle3_client.transports.control``), never a decodable answer."""
    (hooks / "release").touch()
    tensors = _inputs(oracle, 1, ALWAYS_FAIL_SEQ_LEN, seed=13)
    with httpx.Client(base_url=server.url, timeout=120, trust_env=False) as http:
        session = Session(http, STREAMED, mapping)
        received = bytearray()
        with http.stream("POST", "/generate", content=wire.encode(tensors), headers=session.headers) as response:
            assert response.status_code == 200  # the head went out before slice 2
            length = int(response.headers["content-length"])
            with pytest.raises(httpx.RemoteProtocolError):
                for chunk in response.iter_raw():
                    received += chunk
        assert 0 < len(received) < length


def test_rows_reported_final_never_change_afterwards(model_dir: Path) -> None:
    """The watermark's promise, checked directly: at every report, the rows below it already hold
    their final bits (padded rows, 3 batch rows, slices that do not divide the sequence, and the
    whole logits as one slice per batch row)."""
    target = load_target(Settings(model=str(model_dir)))
    mapping = VocabMapping(*vocab_mapping(target.logits_size, 300, seed=1))
    ids, mask, loss = random_batch(target.vocab_size, 3, 203, seed=5)
    inputs = GenerateInputs(ids, mask, loss)
    for slice_rows in (37, None):
        out = target.forward(ids, mask, slice_rows=slice_rows)
        snapshots: list[torch.Tensor] = []

        def on_rows(probs: torch.Tensor, rows: int) -> None:
            snapshots.append(probs.view(-1, probs.shape[-1])[:rows].clone())  # noqa: B023 - called in this loop

        answer = supervision.encode(PROBS, out, inputs, mapping, on_rows=on_rows)
        final = answer["target_probs"].view(-1, answer["target_probs"].shape[-1])
        sizes = [s.shape[0] for s in snapshots]
        assert sizes[0] == 0 and sizes == sorted(sizes) and sizes[-1] == final.shape[0]
        assert len(sizes) > 3  # several reports: rows become final before the answer is
        for snapshot in snapshots:
            assert torch.equal(snapshot, final[: snapshot.shape[0]])
