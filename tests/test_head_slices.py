"""The LM head over slices of the sequence: the same bits as the whole logits, for every encoding and capture.

In process, every encoding (EAGLE-3 padded and packed) and the DFlash full-logits capture are
computed with slices that do not divide the sequence, and compared bit for bit with the
unsliced path and with the independent oracle (``tests/oracle.py``); over HTTP, a server
that slices answers like the oracle, and a server with the default limits takes a sample
longer than the unsliced limit allowed.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from eagle3_appliance.core.inputs import GenerateInputs, Packing, VocabMapping
from eagle3_appliance.launch import ServerProcess
from eagle3_appliance.model import capture as captures
from eagle3_appliance.model import supervision
from eagle3_appliance.model.builtin_model import BUILTIN_CONFIG, ensure_builtin_model
from eagle3_appliance.model.head_slices import MIN_SLICE_ROWS, slice_bounds
from eagle3_appliance.model.loading import load_target
from eagle3_appliance.model.target import Target
from eagle3_appliance.settings import Dtype, Settings
from eagle3_client import RemoteEagle3TargetModel, wire
from eagle3_client.capture import Capture
from eagle3_client.encodings import parse_encoding
from eagle3_client.synthetic import packed_batch, random_batch, vocab_mapping
from eagle3_client.transports.buffers import BufferPool
from tests.oracle import Oracle, assert_bit_exact

ENCODINGS = ["probs", "logits", "hidden", "topk:8"]


@pytest.fixture(scope="module")
def target(model_dir: Path) -> Target:
    return load_target(Settings(model=str(model_dir)))


@pytest.fixture(scope="module")
def bf16_target(model_dir: Path) -> Target:
    return load_target(Settings(model=str(model_dir), dtype=Dtype.bfloat16))


@pytest.fixture(scope="module")
def mapping(target: Target) -> VocabMapping:
    return VocabMapping(*vocab_mapping(target.logits_size, 300, seed=1))


def _equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want)
    for key, expected in want.items():
        assert got[key].dtype == expected.dtype and got[key].shape == expected.shape, key
        assert torch.equal(got[key], expected), key


def test_slices_cover_the_sequence_and_are_never_short() -> None:
    assert slice_bounds(203, 37) == [(0, 37), (37, 74), (74, 111), (111, 148), (148, 185), (185, 203)]
    assert slice_bounds(80, 37) == [(0, 37), (37, 80)]  # a 6-row tail joins the slice before it
    assert slice_bounds(10, 37) == [(0, 10)]  # one slice: shorter than the minimum is the whole sequence
    assert slice_bounds(100, 3) == [(0, 16), (16, 32), (32, 48), (48, 64), (64, 80), (80, 100)]
    for seq_len in range(1, 300, 7):
        bounds = slice_bounds(seq_len, 40)
        assert bounds[0][0] == 0 and bounds[-1][1] == seq_len
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))
        assert len(bounds) == 1 or min(stop - start for start, stop in bounds) >= MIN_SLICE_ROWS


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("encoding", ENCODINGS)
def test_every_encoding_is_bit_identical_over_slices(
    target: Target, bf16_target: Target, mapping: VocabMapping, encoding: str, dtype: str
) -> None:
    model = target if dtype == "float32" else bf16_target
    assert model.dtype == getattr(torch, dtype)
    enc = parse_encoding(encoding)
    hidden = enc.kind == "hidden"
    inputs = GenerateInputs(*random_batch(model.vocab_size, 2, 203, seed=3))
    whole = model.forward(inputs.input_ids, inputs.attention_mask, capture_hidden=hidden)
    want = supervision.encode(enc, whole, inputs, mapping)
    for rows in (16, 37, 100):  # none divides 203
        pool = BufferPool()
        out = model.forward(
            inputs.input_ids, inputs.attention_mask, capture_hidden=hidden, alloc=pool.empty, slice_rows=rows
        )
        assert out.logits is None and out.head is not None  # the logits were never made whole
        _equal(supervision.encode(enc, out, inputs, mapping, alloc=pool.empty), want)


def test_sliced_probs_equal_the_oracle(target: Target, oracle: Oracle, mapping: VocabMapping) -> None:
    """The co-located reference computed independently: shift the whole logits, then project."""
    for seed, (batch, seq_len) in enumerate([(1, 129), (3, 70)]):
        tensors = random_batch(target.vocab_size, batch, seq_len, seed=seed)
        inputs = GenerateInputs(*tensors)
        out = target.forward(inputs.input_ids, inputs.attention_mask, slice_rows=17)
        got = supervision.encode(parse_encoding("probs"), out, inputs, mapping)
        assert_bit_exact(got, oracle.supervision(*tensors, mapping.selected_token_ids, mapping.selected_token_mask))


def test_packed_rows_are_bit_identical_over_slices(target: Target, mapping: VocabMapping) -> None:
    batch = packed_batch(target.vocab_size, [[50, 70, 30], [120, 31]], 160, seed=4)
    packing = Packing(batch["position_ids"], batch["seq_lens"], batch["doc_remaining"])
    inputs = GenerateInputs(batch["input_ids"], batch["attention_mask"], batch["loss_mask"], packing)
    for encoding in ENCODINGS:
        enc = parse_encoding(encoding)
        hidden = enc.kind == "hidden"
        args = (inputs.input_ids, inputs.attention_mask)
        whole = target.forward(*args, capture_hidden=hidden, packing=packing)
        sliced = target.forward(*args, capture_hidden=hidden, packing=packing, slice_rows=23)
        _equal(supervision.encode(enc, sliced, inputs, mapping), supervision.encode(enc, whole, inputs, mapping))


def test_the_dflash_full_logits_capture_and_stacked_rows_are_bit_identical_over_slices(
    target: Target, mapping: VocabMapping
) -> None:
    capture = Capture.parse("dflash+logits:1,3,5,6")
    inputs = GenerateInputs(*random_batch(target.vocab_size, 3, 150, seed=8))
    args = (target, inputs.input_ids, inputs.attention_mask, capture.layers)
    whole, whole_layers = captures.forward_with_layers(*args)
    sliced, sliced_layers = captures.forward_with_layers(*args, slice_rows=40)
    assert sliced.logits is None
    for rows in (None, slice(1, 3)):
        want = captures.encode(capture, whole, whole_layers, rows)
        _equal(captures.encode(capture, sliced, sliced_layers, rows, alloc=BufferPool().empty), want)
    # One request of a stacked (micro-batched) forward: its rows of the sliced head.
    part = GenerateInputs(inputs.input_ids[1:3], inputs.attention_mask[1:3], inputs.loss_mask[1:3])
    probs = parse_encoding("probs")
    _equal(
        supervision.encode(probs, sliced.rows(1, 3), part, mapping),
        supervision.encode(probs, whole.rows(1, 3), part, mapping),
    )


def test_a_head_that_is_not_a_plain_linear_or_a_transformation_after_it_keeps_the_whole_logits(
    model_dir: Path,
) -> None:
    assert load_target(Settings(model=str(model_dir))).slicing_refusal() is None

    scaled = load_target(Settings(model=str(model_dir)))
    own_forward = scaled.model.forward

    def doubled_logits(*args: object, **kwargs: object) -> object:
        out = own_forward(*args, **kwargs)
        out.logits = out.logits * 2  # a transformation after the head that no config announces
        return out

    scaled.model.forward = doubled_logits
    assert "differs from the model's logits" in (scaled.slicing_refusal() or "")

    biased = load_target(Settings(model=str(model_dir)))
    biased.model.lm_head.bias = torch.nn.Parameter(torch.zeros(biased.logits_size))
    assert "plain bias-free nn.Linear" in (biased.slicing_refusal() or "")
    inputs = GenerateInputs(*random_batch(biased.vocab_size, 1, 64, seed=2))
    out = biased.forward(inputs.input_ids, inputs.attention_mask, slice_rows=16)
    assert out.logits is not None and out.head is None  # the slice request is ignored


# -- over HTTP ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slicing_server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The built-in model with 1 MiB slices: 85 positions of its 1024-entry float32 logits."""
    log = tmp_path_factory.mktemp("slices") / "server.log"
    with ServerProcess(["--model", str(model_dir), "--logits-slice-mib", "1"], log_path=log) as proc:
        yield proc


@pytest.mark.parametrize("encoding", ["probs", "logits", "topk:8"])
def test_a_slicing_server_answers_like_the_oracle(slicing_server: ServerProcess, oracle: Oracle, encoding: str) -> None:
    mapping = vocab_mapping(oracle.vocab_size, 512, seed=7)
    with RemoteEagle3TargetModel.from_urls(
        [slicing_server.url], device="cpu", timeout=60, max_retries=0, encoding=encoding
    ) as remote:
        remote.set_vocab_mapping(*mapping)
        for seed, (batch, seq_len) in enumerate([(1, 300), (2, 203), (1, 40)]):  # 4, 3 and 1 slices a row
            inputs = random_batch(oracle.vocab_size, batch, seq_len, seed=seed)
            expected = oracle.supervision(*inputs, *mapping)
            ok, verdict = supervision.compare_to_reference(
                remote.generate_batch(*inputs), expected, parse_encoding(encoding)
            )
            assert ok, verdict


def test_the_default_limits_take_a_sample_longer_than_the_unsliced_limit(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """The 32k-vocabulary checkpoint (context 8192, raised by flag) on the CPU's default budget: the
    unsliced limit was 43,831 tokens; 50,000 now pass the token check (and fail on the ids, so no
    forward runs); past the new limit a 422 names it."""
    tmp = tmp_path_factory.mktemp("wide")
    config = {**BUILTIN_CONFIG, "vocab_size": 32000, "intermediate_size": 256, "max_position_embeddings": 8192}
    model = ensure_builtin_model(tmp, config=config)
    with ServerProcess(["--model", str(model), "--max-seq-len", "200000"], log_path=tmp / "server.log") as proc:
        ids, mask = vocab_mapping(32000, 32000)
        body = wire.encode({"selected_token_ids": ids, "selected_token_mask": mask})
        assert httpx.post(proc.url + "/set_vocab_mapping", content=body, trust_env=False).status_code == 200
        with RemoteEagle3TargetModel.from_urls([proc.url], max_retries=0) as remote:
            served = remote.served_model()
        assert served is not None and served.max_batch_tokens == 122_417

        def generate(seq_len: int) -> httpx.Response:
            ids = torch.full((1, seq_len), 32000)  # out of range: checked after the limits
            request = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": torch.ones_like(ids)}
            return httpx.post(proc.url + "/generate", content=wire.encode(request), trust_env=False, timeout=60)

        assert "input_ids must lie in [0, 32000)" in generate(50_000).json()["error"]
        too_long = generate(122_418)
        assert too_long.status_code == 422
        assert too_long.json()["error"] == "122418 tokens exceed this server's maximum of 122417 per request"
        assert "the LM head over slices of 1,398 positions" in (tmp / "server.log").read_text()
