"""Every kind of bad input gets the right 4xx and a JSON reason, and nothing is corrupted afterwards."""

from __future__ import annotations

import struct
from collections.abc import Callable

import httpx
import pytest
import torch

from eagle3_appliance.launch import ServerProcess
from eagle3_client import RemoteEagle3TargetModel, TargetHTTPError, protocol, wire
from eagle3_client.synthetic import random_batch, vocab_mapping
from tests.oracle import Oracle, assert_bit_exact

VOCAB = 1024


def generate_body(**overrides: torch.Tensor | None) -> bytes:
    input_ids, attention_mask, loss_mask = random_batch(VOCAB, 2, 8, seed=0)
    tensors: dict[str, torch.Tensor | None] = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "loss_mask": loss_mask,
    }
    tensors.update(overrides)
    return wire.encode({k: v for k, v in tensors.items() if v is not None or k in overrides})


def mapping_body(**overrides: torch.Tensor) -> bytes:
    ids, mask = vocab_mapping(VOCAB, 64, seed=0)
    tensors = {"selected_token_ids": ids, "selected_token_mask": mask, **overrides}
    return wire.encode(tensors)


ids32 = torch.zeros(2, 8, dtype=torch.int64)
BAD_GENERATE: list[tuple[str, Callable[[], bytes], int, str]] = [
    ("empty body", lambda: b"", 400, "empty body"),
    ("bad magic", lambda: b"NOPE" + b"\0" * 20, 400, "bad magic"),
    ("truncated", lambda: generate_body()[:-5], 400, "malformed wire body"),
    ("unknown dtype", lambda: generate_body()[:18] + bytes([77]) + generate_body()[19:], 400, "unknown dtype code 77"),
    ("missing key", lambda: wire.encode({"input_ids": ids32, "attention_mask": ids32}), 422, "missing keys"),
    ("None value", lambda: generate_body(loss_mask=None), 422, "missing keys"),
    ("extra key", lambda: generate_body(extra=ids32), 422, "unexpected keys"),
    ("float ids", lambda: generate_body(input_ids=torch.zeros(2, 8)), 422, "input_ids has dtype float32"),
    ("1-D ids", lambda: generate_body(input_ids=torch.zeros(8, dtype=torch.int64)), 422, "must be [batch, seq_len]"),
    ("shape mismatch", lambda: generate_body(loss_mask=torch.zeros(2, 9, dtype=torch.int64)), 422, "loss_mask has shape"),
    ("id too large", lambda: generate_body(input_ids=torch.full((2, 8), VOCAB)), 422, "input_ids must lie in [0, 1024)"),
    ("negative id", lambda: generate_body(input_ids=torch.full((2, 8), -1)), 422, "got values in [-1, -1]"),
    ("mask not 0/1", lambda: generate_body(attention_mask=torch.full((2, 8), 2)), 422, "attention_mask must hold only 0 and 1"),
    ("mask 0.5", lambda: generate_body(loss_mask=torch.full((2, 8), 0.5)), 422, "loss_mask must hold only 0 and 1, got values in [0.5, 0.5]"),
    ("empty batch", lambda: generate_body(**{k: torch.zeros(0, 8, dtype=torch.int64) for k in protocol.GENERATE_INPUT_KEYS}), 422, "empty batch"),
    ("too long", lambda: generate_body(**{k: torch.zeros(1, 513, dtype=torch.int64) for k in protocol.GENERATE_INPUT_KEYS}), 422, "exceeds this server's maximum of 512"),
]  # fmt: skip

BAD_MAPPING: list[tuple[str, Callable[[], bytes], int, str]] = [
    ("mask length", lambda: mapping_body(selected_token_mask=torch.zeros(10, dtype=torch.bool)), 422, "shape [1024]"),
    ("ids range", lambda: mapping_body(selected_token_ids=torch.tensor([0, 5000])), 422, "selected_token_ids must lie"),
    ("ids 2-D", lambda: mapping_body(selected_token_ids=torch.zeros(2, 2, dtype=torch.int64)), 422, "1-D"),
    ("float mask", lambda: mapping_body(selected_token_mask=torch.zeros(VOCAB)), 422, "dtype float32"),
    ("garbage", lambda: b"\x54\x45\x4d\x4e" + struct.pack("<I", 2) + b"ab", 400, "malformed wire body"),
    ("more ids than logits", lambda: mapping_body(selected_token_ids=torch.arange(VOCAB + 1) % VOCAB), 422,
     "selected_token_ids has 1025 ids; this model has 1024 logits, so at most 1024 (each id once)"),
    ("duplicate ids", lambda: mapping_body(selected_token_ids=torch.tensor([3, 9, 3, 700, 9])), 422,
     "selected_token_ids lists 2 id(s) more than once (first: 3); each id may appear once"),
]  # fmt: skip


def _entries_body(count: int) -> bytes:
    """A valid wire blob of ``count`` None entries: a few bytes each, a Python object each once decoded."""
    parts = [struct.pack("<I", wire.MAGIC)]
    for i in range(count):
        key = f"k{i}".encode()
        parts.append(struct.pack("<I", len(key)) + key + bytes([1]))
    return b"".join(parts)


def _empty_but_huge_shape() -> bytes:
    """One entry of 0 bytes whose shape nevertheless overflows any allocator: [2**40, 2**40, 0]."""
    key = b"input_ids"
    dims = b"".join(struct.pack("<q", d) for d in (2**40, 2**40, 0))
    head = struct.pack("<I", len(key)) + key + struct.pack("<BBB", 0, 4, 3) + dims + struct.pack("<Q", 0)
    return struct.pack("<I", wire.MAGIC) + head


WIRE_LIMITS: list[tuple[str, Callable[[], bytes], int, str]] = [
    ("50k entries", lambda: _entries_body(50_000), 400, "more than 16 entries"),
    ("overflowing shape", _empty_but_huge_shape, 400, "shape [1099511627776, 1099511627776, 0] of 'input_ids' is too large"),
]  # fmt: skip


@pytest.fixture(scope="module")
def fresh_server(cache_dir, tmp_path_factory) -> ServerProcess:  # type: ignore[no-untyped-def]
    """A server of its own: the 409 case needs one whose anonymous session has no mapping yet."""
    log = tmp_path_factory.mktemp("bad") / "server.log"
    with ServerProcess(
        ["--cache-dir", str(cache_dir), "--max-seq-len", "512", "--max-body-bytes", "1000000"], log_path=log
    ) as proc:
        yield proc


def _post(url: str, path: str, body: bytes, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(url + path, content=body, headers=headers, timeout=30, trust_env=False)


def _assert_error(resp: httpx.Response, status: int, message: str) -> None:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert body["status"] == status
    assert message in body["error"], body["error"]


def test_generate_before_vocab_mapping_is_409(fresh_server: ServerProcess) -> None:
    _assert_error(_post(fresh_server.url, "/generate", generate_body()), 409, "call /set_vocab_mapping before")


@pytest.mark.parametrize(("name", "body", "status", "message"), BAD_MAPPING, ids=[c[0] for c in BAD_MAPPING])
def test_bad_vocab_mappings(fresh_server: ServerProcess, name: str, body, status: int, message: str) -> None:  # type: ignore[no-untyped-def]
    _assert_error(_post(fresh_server.url, "/set_vocab_mapping", body()), status, message)


@pytest.mark.parametrize(("name", "body", "status", "message"), BAD_GENERATE, ids=[c[0] for c in BAD_GENERATE])
def test_bad_generate_inputs(fresh_server: ServerProcess, name: str, body, status: int, message: str) -> None:  # type: ignore[no-untyped-def]
    assert _post(fresh_server.url, "/set_vocab_mapping", mapping_body()).status_code == 200
    _assert_error(_post(fresh_server.url, "/generate", body()), status, message)


@pytest.mark.parametrize(("name", "body", "status", "message"), WIRE_LIMITS, ids=[c[0] for c in WIRE_LIMITS])
@pytest.mark.parametrize("path", ["/generate", "/set_vocab_mapping", "/lm_head_rows"])
def test_wire_bodies_beyond_the_decoders_limits(
    fresh_server: ServerProcess, path: str, name: str, body, status: int, message: str
) -> None:  # type: ignore[no-untyped-def]
    _assert_error(_post(fresh_server.url, path, body()), status, message)


BAD_ROWS: list[tuple[str, torch.Tensor, str]] = [
    ("more ids than logits", torch.arange(3 * VOCAB) % VOCAB,
     "selected_token_ids has 3072 ids; this model has 1024 logits, so at most 1024 (each id once)"),
    ("duplicate ids", torch.tensor([5, 5]), "selected_token_ids lists 1 id(s) more than once (first: 5)"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "ids", "message"), BAD_ROWS, ids=[c[0] for c in BAD_ROWS])
def test_lm_head_rows_are_bounded_by_the_vocabulary(fresh_server: ServerProcess, name: str, ids: torch.Tensor, message: str) -> None:  # fmt: skip
    _assert_error(_post(fresh_server.url, "/lm_head_rows", wire.encode({"selected_token_ids": ids})), 422, message)
    rows = _post(fresh_server.url, "/lm_head_rows", wire.encode({"selected_token_ids": torch.arange(VOCAB)}))
    assert rows.status_code == 200 and wire.decode(rows.content)["weight"].shape == (VOCAB, 64)  # the whole head


def test_session_offers_and_session_counts_are_bounded(cache_dir, tmp_path) -> None:  # type: ignore[no-untyped-def]
    args = ["--cache-dir", str(cache_dir), "--max-sessions", "2"]
    with (
        ServerProcess(args, log_path=tmp_path / "server.log") as server,
        httpx.Client(base_url=server.url, trust_env=False, timeout=30) as http,
    ):
        _assert_error(http.post("/session", json={"client": "x" * 257}), 422, "'client' must be at most 256 characters")
        first = http.post("/session", json={"client": "x" * 256}).json()["session_id"]
        assert http.post("/session", json={}).status_code == 200
        full = http.post("/session", json={})
        _assert_error(full, 503, "this server already holds 2 client sessions (--max-sessions)")
        assert full.headers["retry-after"] == "60"
        assert http.post("/disconnect", json={}, headers={protocol.SESSION_HEADER: first}).status_code == 200
        assert http.post("/session", json={}).status_code == 200
        assert http.post("/model_info").status_code == 200  # upstream clients (the anonymous session) are not counted


def test_transport_level_errors(fresh_server: ServerProcess) -> None:
    _assert_error(_post(fresh_server.url, "/generate", b"\0" * 1_000_001), 413, "")
    _assert_error(httpx.get(fresh_server.url + "/no_such_endpoint", trust_env=False), 404, "")
    _assert_error(httpx.get(fresh_server.url + "/generate", trust_env=False), 405, "")
    _assert_error(_post(fresh_server.url, "/session", b"[1, 2"), 400, "not valid JSON")
    _assert_error(
        _post(fresh_server.url, "/generate", generate_body(), {protocol.SESSION_HEADER: "nope"}), 410, "unknown"
    )


def test_client_surfaces_the_server_message(fresh_server: ServerProcess) -> None:
    with RemoteEagle3TargetModel.from_urls([fresh_server.url], max_retries=0) as remote:
        ids, mask = vocab_mapping(VOCAB, 32, seed=1)
        remote.set_vocab_mapping(ids, mask)
        with pytest.raises(TargetHTTPError) as info:
            remote.generate_batch(*[torch.full((1, 4), VOCAB + 5)] * 3)
    assert info.value.status == 422
    assert "input_ids must lie in [0, 1024)" in str(info.value)
    assert fresh_server.url in str(info.value)


def test_after_every_bad_input_the_server_is_healthy_and_still_exact(
    fresh_server: ServerProcess, oracle: Oracle
) -> None:
    """Fuzz: every bad body in turn, interleaved with valid requests that must stay bit-exact."""
    ids, mask = vocab_mapping(VOCAB, 500, seed=2)
    cases = [(p, b) for _, b, _, _ in BAD_GENERATE for p in ["/generate"]]
    cases += [("/set_vocab_mapping", b) for _, b, _, _ in BAD_MAPPING]
    cases += [(p, b) for _, b, _, _ in WIRE_LIMITS for p in ["/generate", "/set_vocab_mapping"]]
    with httpx.Client(base_url=fresh_server.url, trust_env=False, timeout=60) as http:
        assert http.post("/set_vocab_mapping", content=wire.encode(
            {"selected_token_ids": ids, "selected_token_mask": mask})).status_code == 200  # fmt: skip
        for i, (path, body) in enumerate(cases):
            assert 400 <= http.post(path, content=body()).status_code < 500
            assert http.get("/health").json() == {"status": "ok"}
            inputs = random_batch(VOCAB, 2, 12, seed=100 + i)
            answer = http.post(
                "/generate", content=wire.encode(dict(zip(protocol.GENERATE_INPUT_KEYS, inputs, strict=True)))
            )
            assert answer.status_code == 200
            assert_bit_exact(wire.decode(answer.content), oracle.supervision(*inputs, ids, mask))
