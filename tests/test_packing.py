"""Packed rows on a real server: the negotiation, every kind of bad packing, and the forward.

The compatibility with upstream's co-located packed path, bit for bit, is
``tests/integration/test_packing_compat.py`` (it needs NeMo AutoModel); here the packed
answer is checked against the appliance's in-process computation and against the same
rows sent one document at a time (what packing must be equivalent to).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import orjson
import pytest
import torch

from eagle3_appliance.core.inputs import GenerateInputs, Packing, VocabMapping
from eagle3_appliance.launch import ServerProcess
from eagle3_appliance.model.loading import load_target
from eagle3_appliance.model.packing import block_causal_mask
from eagle3_appliance.model.supervision import in_process
from eagle3_appliance.model.target import Target
from eagle3_appliance.settings import Device, Settings
from eagle3_client import CapabilityUnavailable, RemoteEagle3TargetModel, protocol, wire
from eagle3_client.capture import Capture
from eagle3_client.synthetic import packed_batch, vocab_mapping
from eagle3_client.transports.control import ControlPlane
from tests.oracle import assert_bit_exact

VOCAB = 1024
ROWS = [[3, 5], [8], [2, 2, 3]]  # documents per row, in tokens; rows of T = 8
T = 8


def good(**overrides: torch.Tensor | None) -> bytes:
    tensors: dict[str, torch.Tensor | None] = {**packed_batch(VOCAB, ROWS, T, seed=1)}
    tensors.update(overrides)
    return wire.encode({k: v for k, v in tensors.items() if v is not None})


@pytest.fixture(scope="module")
def packing_session(server: ServerProcess) -> Iterator[tuple[httpx.Client, str]]:
    """A raw session on the shared server that asked for packing, with a draft vocabulary."""
    with httpx.Client(base_url=server.url, timeout=60, trust_env=False) as http:
        offer = protocol.SessionOffer(client="packing-test", capabilities=(protocol.CAPABILITY_PACKING,))
        reply = protocol.SessionReply.from_json(http.post("/session", json=offer.to_json()).json())
        assert reply.capabilities == (protocol.CAPABILITY_PACKING,)
        mapping = wire.encode(dict(zip(protocol.VOCAB_MAPPING_KEYS, vocab_mapping(VOCAB, 64, seed=0), strict=True)))
        headers = {protocol.SESSION_HEADER: reply.session_id}
        assert http.post("/set_vocab_mapping", content=mapping, headers=headers).status_code == 200
        yield http, reply.session_id
        http.post("/disconnect", json={}, headers=headers)


@pytest.fixture(scope="module")
def target(cache_dir: Path) -> Target:
    return load_target(Settings(cache_dir=cache_dir, device=Device.cpu))


def test_packing_is_granted_only_when_asked(server: ServerProcess) -> None:
    """An offer without capabilities (older clients, Locust without --packed) gets the old reply body."""
    with httpx.Client(base_url=server.url, timeout=30, trust_env=False) as http:
        plain = http.post("/session", json={"client": "old"}).json()
        assert "capabilities" not in plain
        asked = http.post("/session", json={"client": "new", "capabilities": ["packing", "from-the-future"]}).json()
        assert asked["capabilities"] == ["packing"]  # an unknown name is ignored, not refused
        for reply in (plain, asked):
            http.post("/disconnect", json={}, headers={protocol.SESSION_HEADER: reply["session_id"]})


def test_one_offer_carries_a_dflash_capture_and_packing(server: ServerProcess) -> None:
    """Both extensions in one ``/session``: each is echoed; an EAGLE-3 offer stays upstream's body."""
    capture = Capture.dflash([4, 1], logits=True)
    offer = protocol.SessionOffer(client="both", capture=capture, capabilities=(protocol.CAPABILITY_PACKING,))
    body = offer.to_json()
    assert body["capture"] == {"kind": "dflash", "layers": [4, 1], "logits": True}
    assert body["capabilities"] == ["packing"]
    assert set(protocol.SessionOffer(client="plain").to_json()) == {"client", "encoding", "encodings", "data_planes"}
    with httpx.Client(base_url=server.url, timeout=30, trust_env=False) as http:
        reply = protocol.SessionReply.from_json(http.post("/session", json=body).json())
        http.post("/disconnect", json={}, headers={protocol.SESSION_HEADER: reply.session_id})
    assert reply.capture == capture and reply.capabilities == (protocol.CAPABILITY_PACKING,)
    # One description of what a /generate asks for: the session's capture, and the body's packing.
    request = protocol.GenerateRequest.from_keys(list(packed_batch(VOCAB, ROWS, T, seed=1)), capture=capture)
    assert request == protocol.GenerateRequest(capture=capture, packed=True)
    assert request.keys == (*protocol.GENERATE_INPUT_KEYS, *protocol.PACKING_KEYS)
    assert request.capabilities == {protocol.CAPABILITY_PACKING}
    assert protocol.GenerateRequest.from_keys(protocol.GENERATE_INPUT_KEYS) == protocol.GenerateRequest()


def test_a_session_without_packing_is_refused_a_packed_body(server: ServerProcess) -> None:
    """Upstream clients (the anonymous session) never see packing: a packed body is a 422 naming it."""
    mapping = wire.encode(dict(zip(protocol.VOCAB_MAPPING_KEYS, vocab_mapping(VOCAB, 64, seed=0), strict=True)))
    assert httpx.post(server.url + "/set_vocab_mapping", content=mapping, trust_env=False).status_code == 200
    resp = httpx.post(server.url + "/generate", content=good(), timeout=30, trust_env=False)
    assert resp.status_code == 422, resp.text
    assert "['packing']" in resp.json()["error"] and "not granted" in resp.json()["error"]


B = len(ROWS)
BAD: list[tuple[str, Callable[[], bytes], str]] = [
    ("one field missing", lambda: good(doc_remaining=None), "missing keys ['doc_remaining']; a packed request carries all of"),
    ("two fields missing", lambda: good(seq_lens=None, doc_remaining=None), "missing keys ['seq_lens', 'doc_remaining']"),
    ("row sums short", lambda: good(seq_lens=torch.tensor([[3, 5, 0], [7, 0, 0], [2, 2, 4]])), "row 1 sums to 7"),
    ("row sums long", lambda: good(seq_lens=torch.tensor([[3, 6, 0], [8, 0, 0], [2, 2, 4]])), "every row of seq_lens must sum to the row length 8"),
    ("negative length", lambda: good(seq_lens=torch.tensor([[10, -2, 0], [8, 0, 0], [2, 2, 4]])), "seq_lens must not be negative, got a length of -2"),
    ("float lengths", lambda: good(seq_lens=torch.tensor([[3.0, 5.0, 0], [8, 0, 0], [2, 2, 4]])), "seq_lens has dtype float32"),
    ("seq_lens 1-D", lambda: good(seq_lens=torch.tensor([8, 8, 8])), "seq_lens must be [batch=3, max_docs >= 1], got shape [3]"),
    ("seq_lens rows", lambda: good(seq_lens=torch.tensor([[8], [8]])), "seq_lens must be [batch=3, max_docs >= 1], got shape [2, 1]"),
    ("more documents than tokens", lambda: good(seq_lens=torch.cat([torch.tensor([[8], [8], [8]]), torch.zeros(B, 8, dtype=torch.long)], 1)), "seq_lens names 9 documents per row, more than the 8 tokens"),
    ("position_ids shape", lambda: good(position_ids=torch.zeros(B, T + 1, dtype=torch.long)), "position_ids has shape [3, 9]; input_ids has [3, 8]"),
    ("position_ids dtype", lambda: good(position_ids=torch.zeros(B, T)), "position_ids has dtype float32"),
    ("position_ids range", lambda: good(position_ids=torch.full((B, T), T)), "position_ids must lie in [0, 8)"),
    ("doc_remaining shape", lambda: good(doc_remaining=torch.zeros(B, 1, dtype=torch.long)), "doc_remaining has shape [3, 1]"),
    ("doc_remaining dtype", lambda: good(doc_remaining=torch.zeros(B, T, dtype=torch.bool)), "doc_remaining has dtype bool"),
    ("doc_remaining negative", lambda: good(doc_remaining=torch.full((B, T), -1)), "doc_remaining must lie in [0, 8)"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "body", "message"), BAD, ids=[c[0] for c in BAD])
def test_bad_packing_is_a_4xx_naming_the_field(
    packing_session: tuple[httpx.Client, str], name: str, body: Callable[[], bytes], message: str
) -> None:
    http, session = packing_session
    resp = http.post("/generate", content=body(), headers={protocol.SESSION_HEADER: session})
    assert resp.status_code == 422, resp.text
    assert message in resp.json()["error"], resp.json()["error"]


# Lengths whose int64 sum wraps around to the row length of 64 (issue #33): each must be refused
# for itself, before anything is summed, or the row is computed as some other documents.
WRAPPING = {
    "four of 2^62": [2**62, 2**62, 2**62, 2**62 + 64],
    "two of 2^63 - 1": [2**63 - 1, 2**63 - 1, 66],
}


@pytest.mark.parametrize("lengths", list(WRAPPING.values()), ids=list(WRAPPING))
def test_lengths_whose_sum_wraps_are_refused_before_the_forward(
    packing_session: tuple[httpx.Client, str], lengths: list[int]
) -> None:
    http, session = packing_session
    tensors = packed_batch(VOCAB, [[64]], 64, seed=4)
    tensors["seq_lens"] = torch.tensor([lengths])
    assert int(tensors["seq_lens"].sum()) == 64  # the sum alone looks right
    before = _forwards(http.get("/metrics").text)
    resp = http.post("/generate", content=wire.encode(tensors), headers={protocol.SESSION_HEADER: session})
    assert resp.status_code == 422, f"{resp.status_code}: computed as some other documents"
    error = resp.json()["error"]
    assert "seq_lens must lie in [0, 64]" in error and f"{max(lengths)}" in error, error
    assert _forwards(http.get("/metrics").text) == before  # nothing computed


@pytest.mark.parametrize("lengths", list(WRAPPING.values()), ids=list(WRAPPING))
def test_the_packed_mask_refuses_lengths_whose_sum_wraps(lengths: list[int]) -> None:
    """The mask's own check (it also serves the co-located comparison) looks at each length too."""
    with pytest.raises(ValueError, match=r"seq_lens must lie in \[0, 64\]"):
        block_causal_mask(torch.tensor([lengths]), seq_length=64, dtype=torch.float32, device=torch.device("cpu"))


def test_the_mask_limit_is_checked_before_anything_is_computed(cache_dir: Path, tmp_path: Path) -> None:
    """A packed mask grows with T squared: a batch within the token limit can still be refused."""
    # The built-in model needs about 10 kB a token, so the mask of one row of 8192 (268 MB in
    # float32) is beyond the working budget of 8192 tokens (about 86 MB).
    args = ["--cache-dir", str(cache_dir), "--max-batch-tokens", "8192", "--max-seq-len", "8192"]
    with ServerProcess(args, log_path=tmp_path / "server.log") as proc:
        remote = RemoteEagle3TargetModel.from_urls([proc.url], device="cpu", timeout=60, max_retries=0)
        try:
            remote.set_vocab_mapping(*vocab_mapping(VOCAB, 64, seed=0))
            small = packed_batch(VOCAB, [[4, 4]], 8, seed=2)
            assert remote.generate_batch(**small).seq_lens is not None
            wide = packed_batch(VOCAB, [[4096, 4096]], 8192, seed=3)
            metrics = httpx.get(proc.url + "/metrics", trust_env=False).text
            with pytest.raises(Exception, match="attention mask, more than this server's maximum"):
                remote.generate_batch(**wide)
            after = httpx.get(proc.url + "/metrics", trust_env=False).text
            assert _forwards(after) == _forwards(metrics)  # refused before the model ran
        finally:
            remote.close()


def _forwards(metrics: str) -> float:
    line = next(x for x in metrics.splitlines() if x.startswith("eagle3_inference_exec_count_total"))
    return float(line.split()[-1])


def test_a_packed_batch_is_its_documents_run_one_by_one(server: ServerProcess, target: Target) -> None:
    """Each document of a packed row gets what it gets alone, up to kernel rounding (a leak across
    documents would be of the order of the values themselves)."""
    rows = [[3, 5], [8], [2, 2, 3]]
    batch = packed_batch(VOCAB, rows, T, seed=4)
    ids, mask = vocab_mapping(VOCAB, 64, seed=4)
    with RemoteEagle3TargetModel.from_urls([server.url], device="cpu", timeout=60) as remote:
        remote.set_vocab_mapping(ids, mask)
        got = remote.generate_batch(**batch)
    packing = Packing(batch["position_ids"], batch["seq_lens"], batch["doc_remaining"])
    inputs = GenerateInputs(batch["input_ids"], batch["attention_mask"], batch["loss_mask"], packing)
    assert_bit_exact(got, in_process(target, inputs, VocabMapping(ids, mask)))
    for key in protocol.PACKING_KEYS:
        assert torch.equal(getattr(got, key), batch[key])
    for row, docs in enumerate(rows):
        start = 0
        for n in docs:
            alone = target.forward(
                batch["input_ids"][row : row + 1, start : start + n], torch.ones(1, n)
            ).aux_hidden_states
            torch.testing.assert_close(got.aux_hidden_states[row, start : start + n], alone[0], rtol=1e-3, atol=1e-4)
            start += n


def test_the_client_asks_for_all_three_fields_or_none(server: ServerProcess) -> None:
    batch = packed_batch(VOCAB, [[4, 4]], 8, seed=5)
    with RemoteEagle3TargetModel.from_urls([server.url], device="cpu") as remote:
        with pytest.raises(ValueError, match=r"\['doc_remaining'\] missing"):
            remote.generate_batch(
                batch["input_ids"], batch["attention_mask"], batch["loss_mask"],
                position_ids=batch["position_ids"], seq_lens=batch["seq_lens"],
            )  # fmt: skip


def test_an_older_appliance_is_never_asked_to_pack() -> None:
    """A server whose session reply grants no capabilities (an appliance from before packing)."""
    sent: list[str] = []

    def older(request: httpx.Request) -> httpx.Response:
        sent.append(request.url.path)
        if request.url.path == "/session":
            return httpx.Response(200, json=protocol.SessionReply(session_id="s1").to_json())
        return httpx.Response(200, content=orjson.dumps({"status": "ok"}), headers={"Content-Type": "application/json"})

    remote = RemoteEagle3TargetModel.from_urls(["http://older:8001"], max_retries=0)
    remote._servers[0].control = ControlPlane("http://older:8001", max_retries=0, transport=httpx.MockTransport(older))
    try:
        remote.set_vocab_mapping(torch.arange(5), torch.ones(VOCAB, dtype=torch.bool))
        batch = packed_batch(VOCAB, [[4, 4]], 8, seed=6)
        with pytest.raises(CapabilityUnavailable, match="http://older:8001 cannot serve 'packing'.*does not grant it"):
            remote.generate_batch(**batch)
        assert "/generate" not in sent and "/session" in sent
    finally:
        remote.close()


def test_packed_requests_fail_over_exactly(cache_dir: Path, tmp_path: Path, target: Target) -> None:
    """A server killed mid-run: its packed requests are re-sent, packed, to the other one; every answer exact."""
    import signal

    procs = [ServerProcess(["--cache-dir", str(cache_dir)], log_path=tmp_path / f"server-{i}.log") for i in (0, 1)]
    ids, mask = vocab_mapping(VOCAB, 64, seed=8)
    batches = [packed_batch(VOCAB, [[3, 6, 7], [16]][: 1 + i % 2], 16, seed=40 + i) for i in range(12)]
    try:
        for proc in procs:
            proc.start()
        options = {"timeout": 30, "failover_timeout": 60, "probe_interval": 0.2, "probe_max_interval": 1.0}
        with RemoteEagle3TargetModel.from_urls([p.url for p in procs], device="cpu", **options) as remote:
            remote.set_vocab_mapping(ids, mask)
            got = [remote.generate_batch_async(**b).result(60) for b in batches[:4]]
            assert procs[0].proc is not None
            procs[0].proc.send_signal(signal.SIGKILL)
            procs[0].proc.wait(30)
            got += [h.result(120) for h in [remote.generate_batch_async(**b) for b in batches[4:]]]
            stats = {entry["url"]: entry for entry in remote.transport_stats()}
            assert stats[procs[0].url]["state"] == "out" and stats[procs[0].url]["failovers"] >= 1, stats
    finally:
        for proc in procs:
            proc.stop()
    for batch, answer in zip(batches, got, strict=True):
        packing = Packing(batch["position_ids"], batch["seq_lens"], batch["doc_remaining"])
        inputs = GenerateInputs(batch["input_ids"], batch["attention_mask"], batch["loss_mask"], packing)
        assert_bit_exact(answer, in_process(target, inputs, VocabMapping(ids, mask)))
        assert torch.equal(answer.seq_lens, batch["seq_lens"])


def test_micro_batching_never_stacks_packed_requests(cache_dir: Path, tmp_path: Path, target: Target) -> None:
    """Packed rows run alone (bit-exact); unpacked requests of the same length still share a forward."""
    import concurrent.futures
    import threading

    from tests.ops_support import metric, scrape

    args = ["--cache-dir", str(cache_dir), "--microbatch-wait-ms", "500"]
    ids, mask = vocab_mapping(VOCAB, 64, seed=9)
    packed = [packed_batch(VOCAB, [[5, 11], [16]], 16, seed=50 + i) for i in range(3)]
    with ServerProcess(args, log_path=tmp_path / "server.log") as proc:
        options = {"timeout": 60, "max_in_flight_per_server": 8, "data_plane": "wire"}
        with RemoteEagle3TargetModel.from_urls([proc.url], device="cpu", **options) as remote:
            remote.set_vocab_mapping(ids, mask)
            remote.generate_batch(**packed[0])  # the session and its data plane are up before the barrier
            before = scrape(proc.url)
            barrier = threading.Barrier(5)

            def send(i: int) -> object:
                barrier.wait(timeout=30)
                if i < 3:
                    return remote.generate_batch(**packed[i])
                plain = packed_batch(VOCAB, [[16]], 16, seed=60 + i)
                return remote.generate_batch(plain["input_ids"], plain["attention_mask"], plain["loss_mask"])

            with concurrent.futures.ThreadPoolExecutor(5) as pool:
                answers = list(pool.map(send, range(5)))
            after = scrape(proc.url)
    forwards = metric(after, "eagle3_inference_exec_count_total") - metric(before, "eagle3_inference_exec_count_total")
    assert forwards == 4, forwards  # three packed forwards alone, the two unpacked ones stacked
    for batch, answer in zip(packed, answers[:3], strict=True):
        packing = Packing(batch["position_ids"], batch["seq_lens"], batch["doc_remaining"])
        inputs = GenerateInputs(batch["input_ids"], batch["attention_mask"], batch["loss_mask"], packing)
        assert_bit_exact(answer, in_process(target, inputs, VocabMapping(ids, mask)))
