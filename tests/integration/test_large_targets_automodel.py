"""NeMo AutoModel and the large-target modes: the recipe's own target loader, and upstream's client against TP.

* ``--loader automodel`` builds the target through the recipe's own
  ``TrainEagle3Recipe._setup_colocated_target`` (on a real recipe object), which calls AutoModel's
  ``NeMoAutoModelForCausalLM.from_pretrained``. That loader needs CUDA, so here (CPU) the path
  is shown by where it fails, and the arguments the recipe builds are read at the one call
  that needs CUDA; the GPU check (``tests/gpu/check_large_targets.py``) runs it for real.
* Upstream's unmodified client against a tensor-parallel appliance, within the documented tolerance.
"""

from __future__ import annotations

import traceback
from pathlib import Path
from typing import Any

import pytest
import torch

from benchmarks.numerics.run import TP_TEST_CONFIG
from eagle3_appliance.core.inputs import GenerateInputs, VocabMapping
from eagle3_appliance.launch import ServerProcess
from eagle3_appliance.model import checkpoint
from eagle3_appliance.model.builtin_model import ensure_builtin_model
from eagle3_appliance.model.loading import load_target
from eagle3_appliance.model.numerics import measure, reference_and_tie_gaps, tolerance_for
from eagle3_appliance.model.supervision import in_process
from eagle3_appliance.model.target import Target
from eagle3_appliance.settings import Settings
from eagle3_client.synthetic import random_batch, vocab_mapping
from tests.integration.automodel_support import colocated_supervision, env, import_or_skip
from tests.oracle import assert_bit_exact

recipe_module = import_or_skip(checkpoint.AUTOMODEL_RECIPE)
upstream_client = import_or_skip("nemo_automodel.components.speculative.eagle.remote.client")

VOCAB = 1024


def test_the_recipe_loader_is_reached_through_the_recipes_own_code(model_dir: Path) -> None:
    """On the CPU the recipe's loading code runs until AutoModel's loader asks for CUDA."""
    settings = Settings(model=str(model_dir), loader="automodel", attn_implementation="eager")
    assert checkpoint.automodel_refusal(torch.device("cpu")) is not None
    with pytest.raises(BaseException) as failure:  # noqa: PT011 - whatever CUDA-less torch raises
        checkpoint.recipe_colocated_target(settings, model_dir, torch.device("cpu"), torch.float32)
    frames = [(Path(f.filename).as_posix(), f.name) for f in traceback.extract_tb(failure.value.__traceback__)]
    names = [f"{file.rsplit('site-packages/', 1)[-1]}:{fn}" for file, fn in frames]
    recipe = names.index("nemo_automodel/recipes/llm/train_eagle3.py:_setup_colocated_target")
    # The very next frame is AutoModel's loader, called by the recipe (not by us).
    assert names[recipe + 1] == "nemo_automodel/_transformers/auto_model.py:from_pretrained", names
    assert all("eagle3_appliance" not in name for name in names[recipe:]), names
    assert "cuda" in str(failure.value).lower()


class _ForceHfStandIn:
    """Stands in for ``NeMoAutoModelForCausalLM`` at the one call that needs CUDA.

    Records the arguments the recipe built and loads as ``target_force_hf`` asks: the
    transformers model class, through transformers' own ``from_pretrained``.
    """

    calls: list[tuple[str, dict[str, Any]]] = []

    @classmethod
    def from_pretrained(cls, path: str, **kwargs: Any) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM

        cls.calls.append((path, kwargs))
        attn = {"attn_implementation": kwargs["attn_implementation"]} if "attn_implementation" in kwargs else {}
        model: torch.nn.Module = AutoModelForCausalLM.from_pretrained(
            path, dtype=kwargs["torch_dtype"], trust_remote_code=kwargs["trust_remote_code"], **attn
        )
        return model


def test_the_recipe_builds_the_loader_arguments_and_force_hf_loading_is_bit_exact(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(recipe_module, "NeMoAutoModelForCausalLM", _ForceHfStandIn)
    _ForceHfStandIn.calls.clear()
    settings = Settings(model=str(model_dir), loader="automodel", automodel_force_hf=True, attn_implementation="eager")
    recipe = checkpoint.recipe_colocated_target(settings, model_dir, torch.device("cpu"), torch.float32)
    (path, kwargs), *_ = _ForceHfStandIn.calls
    assert path == str(model_dir)
    assert kwargs == {
        "trust_remote_code": False,
        "torch_dtype": torch.float32,
        "force_hf": True,
        "attn_implementation": "eager",
    }
    # What the appliance serves from the recipe's model equals the recipe's own co-located
    # target (its HFEagle3TargetModel) and the plain transformers load, bit for bit.
    served = Target(recipe.target_model, mode="single")
    plain = load_target(Settings(model=str(model_dir), device="cpu", attn_implementation="eager"))
    assert plain.model.config._attn_implementation == "eager"
    for seed, (batch, seq) in enumerate([(2, 19), (1, 1)]):
        ids, mask = vocab_mapping(VOCAB, 200, seed=seed)
        inputs = random_batch(VOCAB, batch, seq, seed=seed)
        ours = in_process(served, GenerateInputs(*inputs), VocabMapping(ids, mask))
        assert_bit_exact(ours, colocated_supervision(recipe.target_wrapper, inputs, ids, mask))
        assert_bit_exact(ours, in_process(plain, GenerateInputs(*inputs), VocabMapping(ids, mask)))


@pytest.fixture(scope="module")
def tp_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_builtin_model(tmp_path_factory.mktemp("tp-model"), TP_TEST_CONFIG)


def test_upstream_client_against_a_tensor_parallel_appliance(tp_model: Path, tmp_path: Path) -> None:
    reference = load_target(Settings(model=str(tp_model), device="cpu"))
    tolerance = tolerance_for(torch.float32)
    args = ["--model", str(tp_model), "--device", "cpu", "--tensor-parallel-size", "2"]
    with ServerProcess(args, log_path=tmp_path / "server.log", startup_timeout=300) as server:
        with env(NEMO_EAGLE_ENABLE_NCCL="0"):
            remote = upstream_client.RemoteEagle3TargetModel.from_urls([server.url], device="cpu", timeout=120)
        try:
            assert remote.model_info()["aux_layer_ids"] == reference.aux_layer_ids
            assert torch.equal(remote.get_input_embeddings().weight, reference.input_embeddings)
            for seed, (batch, seq) in enumerate([(2, 40), (1, 7)]):
                ids, mask = vocab_mapping(8192, 900, seed=seed)
                remote.set_vocab_mapping(ids, mask)
                inputs = random_batch(8192, batch, seq, seed=50 + seed)
                got = remote.generate_batch(*inputs)
                expected, gaps = reference_and_tie_gaps(reference, GenerateInputs(*inputs), VocabMapping(ids, mask))
                deviation = measure(got, expected, gaps, tolerance.tie_gap)
                assert deviation.within(tolerance), deviation.verdict(tolerance)
        finally:
            remote.close()
