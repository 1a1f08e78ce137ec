"""The built-in tiny target: a Llama-architecture model made from a seed, never downloaded.

It exists so that the appliance, its tests and its demo run anywhere (no GPU, no network)
through exactly the code path of a real model: it is saved with ``save_pretrained`` into a
cache folder and then loaded by :func:`eagle3_appliance.model.target.load_target` with
``from_pretrained``, like any local checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

__all__ = ["BUILTIN_CONFIG", "BUILTIN_SEED", "ensure_builtin_model"]

# 8 layers so that the default aux layers [1, 3, 4] are distinct; an initializer range
# larger than Llama's keeps the next-token distributions away from uniform, which makes
# the bit-exactness tests meaningful.
BUILTIN_CONFIG: dict[str, object] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 8,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 1024,
    "max_position_embeddings": 4096,
    "initializer_range": 0.2,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}
BUILTIN_SEED = 1234


def _folder_name(config: dict[str, object], seed: int) -> str:
    digest = hashlib.sha256(json.dumps([config, seed], sort_keys=True).encode()).hexdigest()[:12]
    return f"builtin-llama-{digest}"


def ensure_builtin_model(cache_dir: Path, config: dict[str, object] | None = None, seed: int = BUILTIN_SEED) -> Path:
    """Create the tiny model in ``cache_dir`` once and return its folder.

    The folder is written under a temporary name and renamed into place, so concurrent
    servers starting on one node never see a half-written checkpoint.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = dict(BUILTIN_CONFIG if config is None else config)
    target = Path(cache_dir) / _folder_name(config, seed)
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=target.parent))
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = LlamaForCausalLM(LlamaConfig(**config))  # type: ignore[arg-type]
        model.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").exists():  # lost a race only if the winner finished
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
