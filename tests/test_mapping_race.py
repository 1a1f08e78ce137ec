"""A vocab-mapping change while a batch is in flight: every batch is computed and decoded under one mapping.

The server computes a batch under the mapping its session holds when the request arrives;
the client must decode it with that mapping too (for ``hidden``: that mapping's LM-head rows,
not the new one's), whatever the encoding.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from eagle3_appliance.core.inputs import GenerateInputs, VocabMapping
from eagle3_appliance.model.supervision import compare_to_reference, in_process
from eagle3_appliance.model.target import Target
from eagle3_client import RemoteEagle3TargetModel
from eagle3_client.encodings import parse_encoding
from tests.ops_support import SLOW_TOKEN, make_slow_model, metric, model_env, scrape, server, wait_until

VOCAB, DRAFT = 1024, 300
ENCODINGS = ["probs", "logits", "hidden", "topk:8"]


@pytest.fixture(scope="module")
def slow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Target]]:
    tmp = tmp_path_factory.mktemp("race")
    folder = make_slow_model(tmp / "slow-model", 1.5)
    from transformers import LlamaForCausalLM  # the same weights; the slow subclass only sleeps

    reference = Target(LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32))
    args = ["--model", str(folder), "--trust-remote-code"]
    with server(args, model_env(), tmp / "server.log") as proc:
        yield proc.url, reference


def _mapping(seed: int) -> VocabMapping:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randperm(VOCAB, generator=g)[:DRAFT]
    mask = torch.zeros(VOCAB, dtype=torch.bool)
    mask[ids] = True
    return VocabMapping(ids, mask)


def _inputs(seed: int, *, slow: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (2, 24), generator=g)
    input_ids[0, 0] = SLOW_TOKEN if slow else 1
    return input_ids, torch.ones_like(input_ids), torch.ones_like(input_ids)


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_a_mapping_change_during_a_batch_never_mixes_two_mappings(slow: tuple[str, Target], encoding: str) -> None:
    url, reference = slow
    enc = parse_encoding(encoding)
    old, new = _mapping(1), _mapping(2)
    inputs = _inputs(3, slow=True)
    expected_old = in_process(reference, GenerateInputs(*inputs), old)
    expected_new = in_process(reference, GenerateInputs(*inputs), new)
    assert not torch.equal(expected_old["position_mask"], expected_new["position_mask"])  # the race is visible
    with RemoteEagle3TargetModel.from_urls([url], encoding=encoding, timeout=60, max_retries=0) as remote:
        remote.set_vocab_mapping(old.selected_token_ids, old.selected_token_mask)
        handle = remote.generate_batch_async(*inputs)
        wait_until(lambda: metric(scrape(url), "eagle3_inference_computing") == 1, what="the slow forward")
        remote.set_vocab_mapping(new.selected_token_ids, new.selected_token_mask)  # same draft size
        batch = handle.result(timeout=60)
        ok, verdict = compare_to_reference(batch, expected_old, enc)
        assert ok, f"{encoding}: the batch started under the old mapping is not the old mapping's answer: {verdict}"
        # The next batch is the new mapping's.
        after = remote.generate_batch(*_inputs(4, slow=False))
        ok, verdict = compare_to_reference(
            after, in_process(reference, GenerateInputs(*_inputs(4, slow=False)), new), enc
        )
        assert ok, f"{encoding}: after the change: {verdict}"


def test_rapid_mapping_changes_with_batches_in_flight_give_whole_answers(slow: tuple[str, Target]) -> None:
    """No waiting: each batch may land under either mapping, but never under a mix of the two."""
    url, reference = slow
    enc = parse_encoding("hidden")
    mappings = [_mapping(10 + i) for i in range(3)]
    inputs = [_inputs(20 + i, slow=False) for i in range(6)]
    with RemoteEagle3TargetModel.from_urls([url], encoding="hidden", timeout=60, max_retries=0) as remote:
        remote.set_vocab_mapping(mappings[0].selected_token_ids, mappings[0].selected_token_mask)
        handles = []
        for i, batch_inputs in enumerate(inputs):
            handles.append(remote.generate_batch_async(*batch_inputs))
            if i % 2 == 1:
                m = mappings[(i // 2 + 1) % len(mappings)]
                remote.set_vocab_mapping(m.selected_token_ids, m.selected_token_mask)
        for batch_inputs, handle in zip(inputs, handles, strict=True):
            batch = handle.result(timeout=60)
            verdicts = [
                compare_to_reference(batch, in_process(reference, GenerateInputs(*batch_inputs), m), enc)
                for m in mappings
            ]
            assert any(ok for ok, _ in verdicts), [v for _, v in verdicts]


def test_a_server_refuses_a_mapping_version_that_is_not_a_number(slow: tuple[str, Target], tmp_path: Path) -> None:
    import httpx

    from eagle3_client import protocol, wire

    url, _ = slow
    with httpx.Client(base_url=url, trust_env=False, timeout=30) as http:
        session = http.post("/session", json={}).json()["session_id"]
        m = _mapping(5)
        body = wire.encode({"selected_token_ids": m.selected_token_ids, "selected_token_mask": m.selected_token_mask})
        headers = {protocol.SESSION_HEADER: session, protocol.MAPPING_VERSION_HEADER: "seven"}
        resp = http.post("/set_vocab_mapping", content=body, headers={**headers, "Content-Type": protocol.OCTET_STREAM})
    assert resp.status_code == 400 and protocol.MAPPING_VERSION_HEADER in resp.json()["error"]
