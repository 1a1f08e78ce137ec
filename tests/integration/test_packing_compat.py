"""Packed rows over the remote path, bit for bit against UPSTREAM's co-located packed path.

The rows are built by upstream's own packer (``build_packed_eagle3_dataset`` and its collate,
as the recipe does for ``packed_sequence_size``); the reference is upstream's
``HFEagle3TargetModel.generate_batch(..., position_ids, seq_lens, doc_remaining)`` followed by
upstream's draft-vocab projection. Our side is a real appliance process and our client, over
every exact encoding and data plane the CPU has, on an SDPA and an eager target. An
unmodified upstream server is asked for a packed batch and must be refused, client-side,
before anything is sent.
"""

from __future__ import annotations

import random
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from eagle3_appliance.launch import ServerProcess, free_port
from eagle3_appliance.model.packing import block_causal_mask
from eagle3_client import CapabilityUnavailable, RemoteEagle3TargetModel, protocol
from eagle3_client.synthetic import packed_batch, vocab_mapping
from tests.integration.automodel_support import colocated_supervision, import_or_skip
from tests.integration.test_upstream_compat import start_upstream, stop_upstream
from tests.oracle import assert_bit_exact

upstream_data = import_or_skip("nemo_automodel.components.datasets.llm.eagle3")
upstream_packing = import_or_skip("nemo_automodel.components.datasets.llm.packed_sequence")
upstream_target = import_or_skip("nemo_automodel.components.speculative.eagle.target")

VOCAB = 1024
PAD_ID = 0


def documents(count: int, max_len: int, seed: int) -> list[dict[str, list[int]]]:
    """Chat-like samples as the recipe's source dataset yields them: ids and a response loss mask."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        length = rng.randint(1, max_len)
        prompt = rng.randint(0, length - 1)
        out.append(
            {
                "input_ids": [rng.randrange(1, VOCAB) for _ in range(length)],
                "loss_mask": [0] * prompt + [1] * (length - prompt),
            }
        )
    return out


def packed_batches(size: int, rows: int, seed: int, max_len: int) -> list[dict[str, torch.Tensor]]:
    """Upstream's packed rows (``packed_sequence_size=size``), collated ``rows`` at a time by upstream."""
    packs = upstream_data.build_packed_eagle3_dataset(
        documents(4 * rows * max(1, size // max_len), max_len, seed), packed_sequence_size=size, pad_token_id=PAD_ID
    )
    return [upstream_data._pack_collate(packs[i : i + rows]) for i in range(0, len(packs), rows)]


def upstream_reference(
    colocated: object, batch: dict[str, torch.Tensor], ids: torch.Tensor, mask: torch.Tensor
) -> tuple[dict[str, torch.Tensor], object]:
    """Upstream's packed co-located batch, projected by upstream, and the batch itself."""
    packing = {key: batch[key] for key in protocol.PACKING_KEYS}
    inputs = (batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
    expected = colocated_supervision(colocated, inputs, ids, mask, **packing)
    return expected, colocated.generate_batch(*inputs, **packing)  # type: ignore[attr-defined]


def load(model_dir: Path, attn: str) -> object:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=attn)
    return upstream_target.HFEagle3TargetModel(model.requires_grad_(False))


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def target_pair(
    request: pytest.FixtureRequest, cache_dir: Path, model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ServerProcess, object]]:
    """An appliance on the built-in model with this attention implementation, and upstream's co-located twin."""
    attn = request.param
    log = tmp_path_factory.mktemp("packing") / f"appliance-{attn}.log"
    args = ["--cache-dir", str(cache_dir), "--device", "cpu", "--attn-implementation", attn]
    with ServerProcess(args, log_path=log) as proc:
        yield proc, load(model_dir, attn)


def test_our_mask_is_upstreams_mask() -> None:
    for seed, (size, rows) in enumerate([(16, 1), (40, 3), (64, 4)]):
        seq_lens = packed_batches(size, rows, seed, max_len=size // 2)[0]["seq_lens"]
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            ours = block_causal_mask(seq_lens, seq_length=size, dtype=dtype, device=torch.device("cpu"))
            theirs = upstream_packing.build_block_causal_additive_mask(
                seq_lens, seq_length=size, dtype=dtype, device=torch.device("cpu")
            )
            assert_bit_exact({"mask": ours}, {"mask": theirs})
    short = torch.tensor([[3, 4]])
    with pytest.raises(ValueError, match="sum to"):
        upstream_packing.build_block_causal_additive_mask(
            short, seq_length=8, dtype=torch.float32, device=torch.device("cpu")
        )
    with pytest.raises(ValueError, match="sum to the row length 8"):
        block_causal_mask(short, seq_length=8, dtype=torch.float32, device=torch.device("cpu"))


def test_our_synthetic_packed_rows_are_laid_out_like_upstreams() -> None:
    """``eagle3_client.synthetic.packed_batch`` (Locust, benchmarks) makes the rows upstream's packer makes."""
    rows = [[5, 9, 3], [20], [7, 7]]
    ours = packed_batch(VOCAB, rows, 20, seed=3, prompt_fraction=0.5)
    docs = []
    for r, row in enumerate(rows):
        start = 0
        for n in row:
            ids = ours["input_ids"][r, start : start + n].tolist()
            docs.append({"input_ids": ids, "loss_mask": ours["loss_mask"][r, start : start + n].tolist()})
            start += n
    packs = upstream_data.build_packed_eagle3_dataset(docs, packed_sequence_size=20, pad_token_id=PAD_ID)
    theirs = upstream_data._pack_collate(packs)
    assert_bit_exact(ours, {k: theirs[k] for k in ours})


@pytest.mark.parametrize(("encoding", "data_plane"), [("probs", "wire"), ("probs", "gloo"), ("logits", "wire")])
def test_packed_rows_match_upstreams_colocated_packed_path(
    target_pair: tuple[ServerProcess, object], encoding: str, data_plane: str
) -> None:
    server, colocated = target_pair
    ids, mask = vocab_mapping(VOCAB, 200, seed=11)
    cases = [(24, 1, 8), (48, 3, 20), (64, 2, 64)]  # (packed_sequence_size, rows per batch, longest document)
    remote = RemoteEagle3TargetModel.from_urls(
        [server.url], device="cpu", timeout=60, max_retries=0, encoding=encoding, data_plane=data_plane
    )
    try:
        remote.set_vocab_mapping(ids, mask)
        for seed, (size, rows, max_len) in enumerate(cases):
            for batch in packed_batches(size, rows, seed, max_len)[:2]:
                assert int((batch["seq_lens"] > 0).sum(1).max()) > 1 or size == max_len, "rows should pack documents"
                expected, upstream_batch = upstream_reference(colocated, batch, ids, mask)
                got = remote.generate_batch(
                    batch["input_ids"],
                    batch["attention_mask"],
                    batch["loss_mask"],
                    position_ids=batch["position_ids"],
                    seq_lens=batch["seq_lens"],
                    doc_remaining=batch["doc_remaining"],
                )
                assert type(got) is upstream_target.Eagle3TargetBatch
                assert_bit_exact(got, expected)
                # The packing metadata and the mask travel as the co-located wrapper sets them.
                same = {k: getattr(upstream_batch, k) for k in ("attention_mask", *protocol.PACKING_KEYS)}
                assert_bit_exact(got, same)
                assert sorted(got.to_trainer_inputs()) == sorted(
                    {**upstream_batch.to_trainer_inputs(), "target_probs": 0, "position_mask": 0}.keys()
                    - {"target_logits"}
                )
        stats = remote.transport_stats()[0]
        assert stats["tier"] == data_plane and stats["bytes"][data_plane] > 0
    finally:
        remote.close()


def test_a_packed_batch_differs_from_the_same_rows_unpacked(target_pair: tuple[ServerProcess, object]) -> None:
    """The check above would be empty if packing changed nothing: documents really are kept apart."""
    server, colocated = target_pair
    ids, mask = vocab_mapping(VOCAB, 200, seed=12)
    batch = packed_batches(48, 2, 7, 16)[0]
    with RemoteEagle3TargetModel.from_urls([server.url], device="cpu", timeout=60) as remote:
        remote.set_vocab_mapping(ids, mask)
        unpacked = remote.generate_batch(batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
        packed = remote.generate_batch_async(
            batch["input_ids"],
            batch["attention_mask"],
            batch["loss_mask"],
            position_ids=batch["position_ids"],
            seq_lens=batch["seq_lens"],
            doc_remaining=batch["doc_remaining"],
        ).result(60)
    assert unpacked.seq_lens is None and packed.seq_lens is not None
    assert not torch.equal(unpacked.aux_hidden_states, packed.aux_hidden_states)
    assert_bit_exact(packed, upstream_reference(colocated, batch, ids, mask)[0])


@pytest.fixture
def upstream_url(model_dir: Path, tmp_path: Path) -> Iterator[str]:
    """Upstream's unmodified server on the built-in model, in its own process."""
    port = free_port()
    with open(tmp_path / "upstream_server.log", "wb") as log:
        proc: subprocess.Popen[bytes] = start_upstream(model_dir, port, log)
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            stop_upstream(proc)


def test_an_upstream_server_is_never_asked_to_pack(upstream_url: str) -> None:
    """Upstream's server would run packed rows as single sequences: the client refuses, naming it, sends nothing."""
    url = upstream_url
    ids, mask = vocab_mapping(VOCAB, 100, seed=13)
    batch = packed_batches(32, 2, 9, 12)[0]
    packing = {key: batch[key] for key in protocol.PACKING_KEYS}
    remote = RemoteEagle3TargetModel.from_urls([url], device="cpu", timeout=60, max_retries=0)
    try:
        remote.set_vocab_mapping(ids, mask)
        with pytest.raises(CapabilityUnavailable, match=f"{url} cannot serve 'packing'.*upstream server") as info:
            remote.generate_batch(batch["input_ids"], batch["attention_mask"], batch["loss_mask"], **packing)
        assert info.value.url == url and info.value.capability == protocol.CAPABILITY_PACKING
        handle = remote.generate_batch_async(batch["input_ids"], batch["attention_mask"], batch["loss_mask"], **packing)
        with pytest.raises(CapabilityUnavailable):
            handle.result(60)
        assert remote.transport_stats()[0]["requests"] == 0  # no /generate went out
        # The same rows unpacked are still served (upstream's protocol is untouched).
        got = remote.generate_batch(batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
        assert got.seq_lens is None
    finally:
        remote.close()
