"""Shared pieces of the NeMo AutoModel integration tests.

These tests need the released ``nemo-automodel`` package (``make automodel`` installs it with
its minimal dependencies). Without it they are skipped with the reason, unless
``EAGLE3_REQUIRE_AUTOMODEL=1`` (set by ``.ci/automodel.sh``) turns the skip into a failure, so
CI cannot pass by silently skipping them.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import pytest
import torch

PYTHON = sys.executable
REQUIRE_ENV = "EAGLE3_REQUIRE_AUTOMODEL"
INSTALL_HINT = "`make automodel` (or `bash .ci/automodel.sh`) installs nemo-automodel==0.7.0 with its minimal deps"


def import_or_skip(name: str) -> ModuleType:
    """Import an AutoModel module, or skip (fail under ``EAGLE3_REQUIRE_AUTOMODEL=1``) with the reason."""
    try:
        return importlib.import_module(name)
    except Exception as exc:  # noqa: BLE001 - any import failure means "not usable here"
        reason = f"{name} is not importable ({type(exc).__name__}: {exc}); {INSTALL_HINT}"
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason, allow_module_level=True)
        raise  # unreachable: skip raises


@contextmanager
def env(**values: str) -> Iterator[None]:
    """Set environment variables for the duration of a block."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


def build_draft(model_config: object, draft_vocab_size: int, seed: int) -> torch.nn.Module:
    """Upstream's Llama EAGLE-3 draft for a target config, configured the way the recipe does it."""
    from nemo_automodel.components.speculative.eagle.draft_llama import LlamaEagle3DraftModel
    from transformers import LlamaConfig

    config = model_config.to_dict()  # type: ignore[attr-defined]
    config.update(
        draft_vocab_size=draft_vocab_size,
        target_hidden_size=config["hidden_size"],
        architectures=["LlamaEagle3DraftModel"],
        tie_word_embeddings=False,
        attn_implementation="eager",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        draft = LlamaEagle3DraftModel(LlamaConfig.from_dict(config))
    return draft.to(dtype=torch.float32)  # the recipe's CPU compute dtype


def make_recipe_target(model_dir: Path, out: Path, samples: int = 12) -> Path:
    """A target folder the recipe can read: the built-in model plus a tokenizer and chat data.

    The recipe loads the target's config and tokenizer (it has a chat template) from
    ``target_model_name_or_path`` even with the remote backend, and reads OpenAI-style chat
    rows. The tokenizer is a byte-level BPE trained here in well under a second; its 300
    ids fit the built-in model's 1024-token vocabulary.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    for item in model_dir.iterdir():
        shutil.copy(item, out / item.name)
    answers = [f"{i} is {'even' if i % 2 == 0 else 'odd'}, and {i} squared is {i * i}." for i in range(200)]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    specials = ["<|pad|>", "<|bos|>", "<|eos|>", "<|user|>", "<|assistant|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(answers, trainer)
    # {% generation %} marks what the assistant says, which becomes the loss mask.
    template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}<|eos|>"
        "{% else %}<|assistant|>{% generation %}{{ m['content'] }}<|eos|>{% endgeneration %}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<|pad|>",
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        chat_template=template,
    ).save_pretrained(out)
    with open(out / "train.jsonl", "w") as f:
        for i in range(samples):
            messages = [
                {"role": "user", "content": f"Tell me about {i}."},
                {"role": "assistant", "content": answers[i]},
            ]
            f.write(json.dumps({"messages": messages}) + "\n")
    return out


def python_env(**extra: str) -> dict[str, str]:
    """The environment for a child Python: this checkout first on the path, unbuffered output."""
    root = str(Path(__file__).resolve().parents[2])
    path = os.environ.get("PYTHONPATH", "")
    return {
        **os.environ,
        "PYTHONPATH": root + (os.pathsep + path if path else ""),
        "PYTHONUNBUFFERED": "1",
        "HF_HUB_OFFLINE": "1",
        **extra,
    }


def load_colocated(model_dir: Path) -> object:
    """Upstream's co-located backend (``HFEagle3TargetModel``) on the built-in model, in float32."""
    from nemo_automodel.components.speculative.eagle.target import HFEagle3TargetModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return HFEagle3TargetModel(model.requires_grad_(False))


def colocated_supervision(
    colocated: object,
    inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    selected_token_ids: torch.Tensor,
    selected_token_mask: torch.Tensor,
    **packing: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """What upstream computes in-process: its co-located batch, projected the way its trainer does.

    ``packing``: upstream's ``position_ids``, ``seq_lens`` and ``doc_remaining`` for packed rows.
    """
    from nemo_automodel.components.speculative.eagle.core import _compute_target_distribution

    batch = colocated.generate_batch(*inputs, **packing)  # type: ignore[attr-defined]
    target_probs, position_mask = _compute_target_distribution(
        target_logits=batch.logits,
        selected_token_ids=selected_token_ids,
        selected_token_mask=selected_token_mask,
        loss_mask=batch.loss_mask,
    )
    return {
        "aux_hidden_states": batch.aux_hidden_states,
        "target_probs": target_probs,
        "position_mask": position_mask,
        "input_ids": batch.input_ids,
        "loss_mask": batch.loss_mask,
    }


def make_qwen3_recipe_target(root: Path, *, samples: int, layers: int = 8) -> Path:
    """:func:`make_recipe_target` over a tiny Qwen3 (hidden 64, ``layers`` decoder layers, 1024 ids, untied
    head) made from seed 3: the target of the DFlash and DSpark recipe tests."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=1024,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        initializer_range=0.2,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        Qwen3ForCausalLM(config).save_pretrained(root / "model")
    return make_recipe_target(root / "model", root / "target", samples=samples)
