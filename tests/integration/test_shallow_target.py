"""A two-layer text target, started with no family-specific flags, serves DSpark and DFlash bit for bit.

EAGLE-3's default aux layers ``[1, L//2 - 1, L - 4]`` do not fit two layers. The server starts
anyway and answers DSpark and DFlash (padded and packed) exactly as upstream's
``HFDSparkTargetModel`` and ``HFDFlashTargetModel`` do in this process; only an EAGLE-3 client is
refused, saying to pass ``--aux-layer-ids``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from eagle3_appliance.launch import ServerProcess
from eagle3_client import RemoteDFlashTargetModel, RemoteDSparkTargetModel, TargetHTTPError, protocol
from eagle3_client.synthetic import random_batch
from tests.integration.automodel_support import import_or_skip
from tests.integration.test_packing_compat import packed_batches

dspark = import_or_skip("nemo_automodel.components.speculative.dspark.target")
dflash = import_or_skip("nemo_automodel.components.speculative.dflash.target")

VOCAB = 1024


@pytest.fixture(scope="module")
def shallow_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
    )
    folder = tmp_path_factory.mktemp("shallow") / "model"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        Qwen3ForCausalLM(config).eval().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def shallow_server(shallow_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("shallow-logs") / "server.log"
    with ServerProcess(["--model", str(shallow_dir), "--device", "cpu"], log_path=log) as proc:
        yield proc


@pytest.fixture(scope="module")
def hf_model(shallow_dir: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(shallow_dir, dtype=torch.float32).requires_grad_(False)


def assert_same(got: object, want: object) -> None:
    assert type(got) is type(want)
    for name in want.__dataclass_fields__:  # type: ignore[attr-defined]
        a, b = getattr(got, name), getattr(want, name)
        if not isinstance(b, torch.Tensor):
            assert a == b, name
            continue
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), name


@pytest.mark.parametrize("layers", [[-1, 1], [0], [-1, 0, 1]], ids=str)
def test_dspark_is_upstreams_padded_and_packed(
    shallow_server: ServerProcess, hf_model: torch.nn.Module, layers: list[int]
) -> None:
    reference = dspark.HFDSparkTargetModel(hf_model, target_layer_ids=layers)
    with RemoteDSparkTargetModel.from_urls([shallow_server.url], target_layer_ids=layers) as remote:
        for seed, (rows, length) in enumerate([(2, 24), (3, 17)]):
            inputs = random_batch(VOCAB, rows, length, seed=40 + seed, pad=True)
            assert_same(remote.generate_batch(*inputs), reference.generate_batch(*inputs))
        for batch in packed_batches(48, 2, 50, 20)[:2]:
            packing = {key: batch[key] for key in protocol.PACKING_KEYS}
            inputs = (batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
            assert_same(remote.generate_batch(*inputs, **packing), reference.generate_batch(*inputs, **packing))


@pytest.mark.parametrize("logits", [False, True])
def test_dflash_is_upstreams(shallow_server: ServerProcess, hf_model: torch.nn.Module, logits: bool) -> None:
    reference = dflash.HFDFlashTargetModel(hf_model, target_layer_ids=[1, 0], capture_logits=logits)
    with RemoteDFlashTargetModel.from_urls(
        [shallow_server.url], target_layer_ids=[1, 0], capture_logits=logits
    ) as remote:
        inputs = random_batch(VOCAB, 2, 19, seed=60, pad=True)
        assert_same(remote.generate_batch(*inputs), reference.generate_batch(*inputs))


def test_eagle3_is_refused_saying_what_to_pass(shallow_server: ServerProcess) -> None:
    from eagle3_client import RemoteEagle3TargetModel

    selected = torch.arange(32)
    mask = torch.zeros(VOCAB, dtype=torch.bool)
    mask[selected] = True
    with pytest.raises(TargetHTTPError, match="--aux-layer-ids") as info:
        with RemoteEagle3TargetModel.from_urls([shallow_server.url], max_retries=0) as remote:
            remote.set_vocab_mapping(selected, mask)
            remote.generate_batch(*random_batch(VOCAB, 1, 8, seed=1))
    assert info.value.status == 422
    assert "too shallow for the default aux layers" in str(info.value)
