"""The request limits: derived from the model and the device unless a flag sets them, printed at
start-up, and what an upstream client meets (a 16k sequence on a model made for it is accepted)."""

from __future__ import annotations

import httpx
import pytest
import torch

from eagle3_appliance.launch import ServerProcess
from eagle3_appliance.model.builtin_model import BUILTIN_CONFIG, ensure_builtin_model
from eagle3_appliance.model.limits import (
    CPU_BUDGET_BYTES,
    CUDA_BUDGET_FRACTION,
    FALLBACK_MAX_SEQ_LEN,
    TargetShape,
    derive_limits,
)
from eagle3_appliance.settings import Settings
from eagle3_client import RemoteEagle3TargetModel, wire
from eagle3_client.synthetic import vocab_mapping

GiB = 1 << 30
# Llama-3.1-8B's config.json, the numbers that matter here.
LLAMA_8B = TargetShape(
    max_position_embeddings=131072, vocab_size=128256, hidden_size=4096, intermediate_size=14336, dtype_bytes=2
)


def test_the_sequence_limit_is_the_models_context_and_flags_win() -> None:
    limits = derive_limits(Settings(), LLAMA_8B, device=torch.device("cpu"))
    assert limits.max_seq_len == 131072 and "max_position_embeddings" in limits.sources["max_seq_len"]
    unknown = TargetShape(None, vocab_size=1024, hidden_size=64, intermediate_size=128, dtype_bytes=4)
    assert derive_limits(Settings(), unknown, device=torch.device("cpu")).max_seq_len == FALLBACK_MAX_SEQ_LEN
    pinned = derive_limits(Settings(max_seq_len=300, max_batch_tokens=900), LLAMA_8B, device=torch.device("cpu"))
    assert (pinned.max_seq_len, pinned.max_batch_tokens) == (300, 900)
    assert pinned.sources == {"max_seq_len": "--max-seq-len", "max_batch_tokens": "--max-batch-tokens"}


def test_the_token_limit_is_what_fits_next_to_the_weights() -> None:
    # An 80 GB GPU with an 8B bf16 model loaded: about 62 GiB free.
    gpu = derive_limits(Settings(), LLAMA_8B, device=torch.device("cuda"), free_bytes=62 * GiB)
    per_token = LLAMA_8B.bytes_per_token()
    assert 7.0e5 < per_token < 8.0e5  # activations + a whole-vocabulary float32 answer: ~0.75 MB a token
    assert gpu.slice_rows == (512 << 20) // LLAMA_8B.slice_bytes_per_row()
    working = int(62 * GiB * CUDA_BUDGET_FRACTION) - gpu.slice_rows * LLAMA_8B.slice_bytes_per_row()
    assert gpu.working_bytes == working and gpu.max_batch_tokens == working // per_token
    assert gpu.max_batch_tokens >= 65536  # a 32k sequence fits twice
    half = derive_limits(Settings(), LLAMA_8B, device=torch.device("cuda"), free_bytes=31 * GiB)
    assert (
        half.max_batch_tokens == (int(31 * GiB * CUDA_BUDGET_FRACTION) - (512 << 20) // 1026048 * 1026048) // per_token
    )
    cpu = derive_limits(Settings(), LLAMA_8B, device=torch.device("cpu"))
    assert "CPU budget" in cpu.sources["max_batch_tokens"]
    assert cpu.max_batch_tokens == (CPU_BUDGET_BYTES - cpu.slice_rows * LLAMA_8B.slice_bytes_per_row()) // per_token
    text = gpu.describe()
    assert f"max_batch_tokens {gpu.max_batch_tokens:,}" in text and "max_seq_len 131,072" in text
    assert f"the LM head over slices of {gpu.slice_rows:,} positions" in text


def test_unsliced_limits_are_the_whole_logits_per_token() -> None:
    """``--logits-slice-mib 0``: the logits and their scratch count per token, as before slicing."""
    per_token = LLAMA_8B.unsliced_bytes_per_token()
    assert 1.4e6 < per_token < 1.7e6  # logits + a whole-vocabulary answer dominate: ~1.5 MB a token
    gpu = derive_limits(Settings(logits_slice_mib=0), LLAMA_8B, device=torch.device("cuda"), free_bytes=62 * GiB)
    assert gpu.slice_rows is None and gpu.max_batch_tokens == int(62 * GiB * CUDA_BUDGET_FRACTION) // per_token
    assert gpu.unsliced_tokens == gpu.max_batch_tokens
    assert gpu.sliced(torch.device("cpu"), 10**6, 10**6) is None
    assert "over the whole sequence" in gpu.describe()


def test_slicing_quadruples_the_longest_llama_8b_sample_on_an_80_gb_gpu() -> None:
    """The issue's target: Llama-3.1-8B in bf16 on one 80 GiB GPU, its weights beside (what ``sizes`` prints)."""
    free = 80 * GiB - 8_030_261_248 * 2
    before = derive_limits(Settings(logits_slice_mib=0), LLAMA_8B, device=torch.device("cuda"), free_bytes=free)
    after = derive_limits(Settings(), LLAMA_8B, device=torch.device("cuda"), free_bytes=free)
    assert before.max_batch_tokens == 36_655  # the old limit (about 36K, as the issue says)
    assert after.max_batch_tokens == 73_319  # any draft vocabulary, up to the whole vocabulary: 2x
    draft_32k = after.tokens_for(LLAMA_8B.bytes_per_token(draft_vocab=32768))
    assert draft_32k == 148_447 and draft_32k >= 4 * before.max_batch_tokens
    assert after.unsliced_tokens == before.max_batch_tokens
    # On an accelerator what the unsliced path holds keeps it; beyond, slices.
    cuda = torch.device("cuda")
    assert after.sliced(cuda, before.max_batch_tokens, before.max_batch_tokens) is None
    assert after.sliced(cuda, before.max_batch_tokens + 1, before.max_batch_tokens + 1) == after.slice_rows
    assert after.sliced(torch.device("cpu"), 4 * after.slice_rows, 4 * after.slice_rows) == after.slice_rows


def test_the_wide_checkpoint_on_cpu_takes_nearly_three_times_the_old_longest_sample() -> None:
    """The 32k-vocabulary checkpoint of ``benchmarks.long`` in float32 on the CPU's 16 GiB budget."""
    wide = TargetShape(8192, vocab_size=32000, hidden_size=64, intermediate_size=256, dtype_bytes=4)
    before = derive_limits(Settings(logits_slice_mib=0), wide, device=torch.device("cpu"))
    after = derive_limits(Settings(), wide, device=torch.device("cpu"))
    assert before.max_batch_tokens == 43_831
    assert after.max_batch_tokens == 122_417 and after.slice_rows == 1398
    assert after.tokens_for(wide.bytes_per_token(draft_vocab=8192)) == 408_708
    # A flag still wins over every derived figure.
    pinned = derive_limits(Settings(max_batch_tokens=5000), wide, device=torch.device("cpu"))
    assert pinned.tokens_for(wide.bytes_per_token(draft_vocab=10)) == 5000


@pytest.fixture(scope="module")
def long_context_server(tmp_path_factory: pytest.TempPathFactory) -> ServerProcess:
    """The tiny model with a 16k context, served with no limit flags at all."""
    tmp = tmp_path_factory.mktemp("limits")
    model = ensure_builtin_model(tmp, config={**BUILTIN_CONFIG, "max_position_embeddings": 16384})
    with ServerProcess(["--model", str(model)], log_path=tmp / "server.log") as proc:
        proc.log_text = lambda: (tmp / "server.log").read_text()  # type: ignore[attr-defined]
        yield proc


def _generate(url: str, seq_len: int) -> httpx.Response:
    ids = torch.full((1, seq_len), 1024)  # out of range: checked after the limits, so no forward runs
    body = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": torch.ones_like(ids)}
    return httpx.post(url + "/generate", content=wire.encode(body), trust_env=False, timeout=60)


def test_a_server_without_limit_flags_takes_the_models_context(long_context_server: ServerProcess) -> None:
    url = long_context_server.url
    ids, mask = vocab_mapping(1024, 64)
    assert httpx.post(url + "/set_vocab_mapping", content=wire.encode(
        {"selected_token_ids": ids, "selected_token_mask": mask}), trust_env=False).status_code == 200  # fmt: skip
    with RemoteEagle3TargetModel.from_urls([url], max_retries=0) as remote:
        served = remote.served_model()
    assert served is not None and served.max_seq_len == 16384
    tiny = TargetShape(16384, vocab_size=1024, hidden_size=64, intermediate_size=128, dtype_bytes=4)
    assert served.max_batch_tokens == derive_limits(Settings(), tiny, device=torch.device("cpu")).max_batch_tokens
    # 16,000 tokens pass the length check (and fail on the ids instead); 16,385 do not.
    assert "input_ids must lie in [0, 1024)" in _generate(url, 16000).json()["error"]
    too_long = _generate(url, 16385)
    assert too_long.status_code == 422
    assert too_long.json()["error"] == "sequence length 16385 exceeds this server's maximum of 16384"
    log = long_context_server.log_text()  # type: ignore[attr-defined]
    assert (
        f"limits: max_seq_len 16,384 (the model's max_position_embeddings), max_batch_tokens {served.max_batch_tokens:,}"
        in log
    )


def test_the_sizes_command_prints_the_longest_sample_before_and_after() -> None:
    from typer.testing import CliRunner

    from eagle3_appliance.cli import app
    from eagle3_appliance.sizes import PRESETS, load_shape, longest_rows

    rows = longest_rows(PRESETS["llama-3.1-8b"], draft_vocab=32768, dtype_bytes=2, slice_mib=512)
    at_80 = next(r for r in rows if r.memory_gib == 80)
    assert (at_80.unsliced, at_80.sliced_whole_vocab, at_80.sliced_draft_vocab) == (36_655, 73_319, 148_447)
    tp = longest_rows(PRESETS["llama-3.1-70b"], draft_vocab=32768, dtype_bytes=2, slice_mib=512)
    assert {r.tensor_parallel for r in tp} == {4, 8} and all(r.sliced_whole_vocab is None for r in tp)
    assert (
        longest_rows(load_shape("qwen3-8b"), draft_vocab=32768, dtype_bytes=2, slice_mib=0)[0].sliced_draft_vocab
        is None
    )
    result = CliRunner().invoke(app, ["sizes", "--model", "llama-3.1-8b", "--model", "llama-3.1-70b", "--markdown"])
    assert result.exit_code == 0, result.output
    assert "| llama-3.1-8b | 1 | 80 | 15.0 GiB | 36,655 | 73,319 (2.0x) | 148,447 (4.0x) |" in result.output
    assert "| llama-3.1-70b | 8 | 80 | 16.4 GiB | 30,923 | unsliced (sharded head) | unsliced (sharded head) |" in (
        result.output
    )
