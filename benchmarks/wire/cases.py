"""The benchmark's model cases: the built-in tiny model and a wide one with a ~275 MB answer."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["CASES", "Case", "model_source"]


@dataclass(frozen=True)
class Case:
    """A model (the built-in config, or an override of it) and one ``/generate`` batch shape."""

    name: str
    batch_size: int
    seq_len: int
    draft_vocab: int
    config_override: dict[str, object] | None = None

    def config(self) -> dict[str, object] | None:
        if self.config_override is None:
            return None
        from eagle3_appliance.model.builtin_model import BUILTIN_CONFIG

        return {**BUILTIN_CONFIG, **self.config_override}


CASES: dict[str, Case] = {
    # The built-in tiny Llama (V=1024, H=64): a ~3 MB answer, dominated by per-request overhead.
    "tiny": Case("tiny", batch_size=2, seq_len=512, draft_vocab=512),
    # A Llama with a 32k vocabulary and a 32k draft vocabulary, B=1, T=2048: target_probs is
    # 2048 x 32768 x 4 B = 268 MB plus 6 MB of aux states, the size of an 8B target's answer.
    # Narrow layers (H=256) keep the forward affordable on two CPU cores.
    "wide": Case(
        "wide",
        batch_size=1,
        seq_len=2048,
        draft_vocab=32768,
        config_override={
            "hidden_size": 256,
            "intermediate_size": 256,
            "vocab_size": 32768,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
        },
    ),
}


def model_source(case: Case, cache_dir: Path) -> str:
    """What to pass as ``--model``: ``builtin``, or the folder of the case's generated model."""
    config = case.config()
    if config is None:
        return "builtin"
    from eagle3_appliance.model.builtin_model import ensure_builtin_model

    return str(ensure_builtin_model(cache_dir, config=config))
