"""A server restarted on its address with another model is never used (issue #33, item 2).

The restart happens while the client is idle, so its next request meets the new process with
the old session id: HTTP 410, and the client registers again. That new session must report
the model the client pinned at its first connect, on every path: a request, the DFlash LM head
fetch, a fleet.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from eagle3_appliance.core.inputs import GenerateInputs, VocabMapping
from eagle3_appliance.launch import ServerProcess
from eagle3_appliance.model.builtin_model import ensure_builtin_model
from eagle3_appliance.model.loading import load_target
from eagle3_appliance.model.supervision import in_process, supervision_equal
from eagle3_appliance.settings import Settings
from eagle3_client import ModelMismatch, RemoteDFlashTargetModel, RemoteEagle3TargetModel
from eagle3_client.synthetic import random_batch, vocab_mapping
from tests.test_fleet import start_all

VOCAB, DRAFT = 1024, 200


@pytest.fixture(scope="module")
def other_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built-in architecture with other weights: another fingerprint."""
    return ensure_builtin_model(tmp_path_factory.mktemp("other"), seed=999)


def swap(proc: ServerProcess, model: Path, log: Path) -> ServerProcess:
    """Stop ``proc`` and start a server of ``model`` on its port."""
    port = proc.port
    proc.stop()
    return ServerProcess(["--model", str(model)], port=port, log_path=log).start()


def test_a_single_server_restarted_with_another_model_raises_model_mismatch(
    cache_dir: Path, other_model: Path, tmp_path: Path
) -> None:
    mapping = vocab_mapping(VOCAB, DRAFT, seed=3)
    inputs = random_batch(VOCAB, 2, 12, seed=1)
    proc = ServerProcess(["--cache-dir", str(cache_dir)], log_path=tmp_path / "a.log").start()
    try:
        with RemoteEagle3TargetModel.from_urls([proc.url], failover_timeout=5) as remote:
            remote.set_vocab_mapping(*mapping)
            remote.generate_batch(*inputs)
            proc = swap(proc, other_model, tmp_path / "b.log")
            with pytest.raises(ModelMismatch) as info:
                remote.generate_batch(*inputs)
            assert proc.url in str(info.value) and "another model" in str(info.value)
            with pytest.raises(ModelMismatch):  # and it keeps refusing it
                remote.generate_batch(*inputs)
    finally:
        proc.stop()


def test_a_dflash_client_never_fetches_the_lm_head_of_a_swapped_model(
    cache_dir: Path, other_model: Path, tmp_path: Path
) -> None:
    proc = ServerProcess(["--cache-dir", str(cache_dir)], log_path=tmp_path / "a.log").start()
    try:
        with RemoteDFlashTargetModel.from_urls([proc.url], target_layer_ids=[1, 3], failover_timeout=5) as remote:
            remote.generate_batch(*random_batch(VOCAB, 1, 8, seed=2))
            proc = swap(proc, other_model, tmp_path / "b.log")
            with pytest.raises(ModelMismatch):
                remote.get_output_embeddings()
    finally:
        proc.stop()


def test_a_fleet_keeps_a_swapped_server_out_and_answers_from_its_model(
    cache_dir: Path, other_model: Path, tmp_path: Path
) -> None:
    reference = load_target(Settings(cache_dir=cache_dir))
    mapping = VocabMapping(*vocab_mapping(VOCAB, DRAFT, seed=3))
    procs = start_all(
        [ServerProcess(["--cache-dir", str(cache_dir)], log_path=tmp_path / f"s{i}.log") for i in range(2)]
    )
    try:
        options: dict[str, Any] = {"failover_timeout": 30, "probe_interval": 0.2, "probe_max_interval": 1.0}
        with RemoteEagle3TargetModel.from_urls([p.url for p in procs], **options) as remote:
            remote.set_vocab_mapping(mapping.selected_token_ids, mapping.selected_token_mask)
            remote.generate_batch(*random_batch(VOCAB, 2, 8, seed=50))
            procs[0] = swap(procs[0], other_model, tmp_path / "swapped.log")
            inputs = [random_batch(VOCAB, 2, 8 + i, seed=60 + i) for i in range(6)]
            handles = [remote.generate_batch_async(*batch) for batch in inputs]  # both servers get some
            got = [h.result(timeout=120) for h in handles]
            stats = {entry["url"]: entry for entry in remote.transport_stats()}
        for batch, batch_inputs in zip(got, inputs, strict=True):
            expected = in_process(reference, GenerateInputs(*batch_inputs), mapping)
            assert supervision_equal(batch, expected), "an answer of the other model"
        swapped = stats[procs[0].url]
        assert swapped["state"] == "out" and "another model" in swapped["reason"], swapped
        assert stats[procs[1].url]["served"] >= len(inputs)
    finally:
        for p in procs:
            p.stop()


def test_the_fingerprint_pinned_first_is_the_one_checked() -> None:
    """The pin itself: the first fingerprint wins, the same one passes, another raises naming both."""
    from eagle3_client.remote.pin import ModelPin

    pin = ModelPin()
    pin.check("http://a:1", None)  # an upstream server: nothing to pin
    pin.check("http://a:1", "sha256:aa")
    pin.check("http://b:1", "sha256:aa")
    with pytest.raises(ModelMismatch) as info:
        pin.check("http://b:1", "sha256:bb")
    assert info.value.fingerprints == {"http://a:1": "sha256:aa", "http://b:1": "sha256:bb"}
    assert pin.fingerprint == "sha256:aa"
