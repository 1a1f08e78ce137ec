"""A failure inside the server (a bug, a failed forward) answers 500 with a request id, never the
exception's text, and the server's log has the traceback under that id."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import pytest
import torch

from eagle3_client import protocol, wire
from eagle3_client.synthetic import vocab_mapping
from tests.ops_support import model_env, server

SECRET = "CUDA error: an illegal memory access at /opt/site/internal/kernels.cu:42"
FAIL_TOKEN = 5

_MODELING = f'''
"""A Llama whose forward fails like a broken kernel when a batch starts with token {FAIL_TOKEN} (tests only)."""
from transformers import LlamaForCausalLM


class FailingLlamaForCausalLM(LlamaForCausalLM):
    def forward(self, input_ids=None, **kwargs):
        if input_ids is not None and int(input_ids[0, 0]) == {FAIL_TOKEN}:
            raise RuntimeError({SECRET!r})
        return super().forward(input_ids=input_ids, **kwargs)
'''


def _failing_model(folder: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=1024, max_position_embeddings=512,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_failing.FailingLlamaForCausalLM"}
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "modeling_failing.py").write_text(_MODELING)
    return folder


@pytest.fixture(scope="module")
def failing(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    tmp = tmp_path_factory.mktemp("internal")
    model = _failing_model(tmp / "model")
    log = tmp / "server.log"
    with server(["--model", str(model), "--trust-remote-code"], model_env(), log) as proc:
        yield proc, log


def _generate(url: str, first_token: int) -> httpx.Response:
    ids = torch.full((1, 8), 3)
    ids[0, 0] = first_token
    body = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": torch.ones_like(ids)}
    return httpx.post(url + "/generate", content=wire.encode(body), trust_env=False, timeout=60)


def test_a_failed_forward_answers_500_with_a_request_id_and_logs_the_reason(failing) -> None:  # type: ignore[no-untyped-def]
    proc, log = failing
    ids, mask = vocab_mapping(1024, 64)
    mapping = wire.encode({"selected_token_ids": ids, "selected_token_mask": mask})
    assert httpx.post(proc.url + "/set_vocab_mapping", content=mapping, trust_env=False).status_code == 200
    first, second = _generate(proc.url, FAIL_TOKEN), _generate(proc.url, FAIL_TOKEN)
    for resp in (first, second):
        assert resp.status_code == 500
        body = resp.json()
        request_id = resp.headers[protocol.ERROR_ID_HEADER]
        assert re.fullmatch(r"[0-9a-f]{32}", request_id)
        assert body == {
            "error": f"internal server error (request id {request_id}); the server's log has the details",
            "type": "InternalError",
            "status": 500,
            "request_id": request_id,
        }
        assert "illegal memory" not in resp.text and "RuntimeError" not in resp.text
    assert first.headers[protocol.ERROR_ID_HEADER] != second.headers[protocol.ERROR_ID_HEADER]
    text = log.read_text()
    for resp in (first, second):
        line = next(x for x in text.splitlines() if resp.headers[protocol.ERROR_ID_HEADER] in x)
        assert "POST /generate failed" in line
    assert text.count(SECRET) >= 2  # the operator still sees why, once per failure
    assert _generate(proc.url, 1).status_code == 200  # and the server goes on serving
