"""Run NeMo AutoModel's EAGLE-3 recipe once, on the CPU, and save what it trained (a test fixture).

    python tests/integration/recipe_runner.py remote OUT.pt -c recipe.yaml [--key=value ...]
    python tests/integration/recipe_runner.py colocated OUT.pt -c recipe.yaml [--key=value ...]

``remote`` runs our launcher (``eagle3_client.automodel_launch.main``), ``colocated`` runs upstream's
own ``train_eagle3.main``. Both get the same three instruments, none of which changes what a
training step computes:

- ``_forward_batch`` is wrapped to record each micro-batch's loss;
- before the loop the draft's trainable weights are reset from a fixed seed: the recipe builds
  its draft before it seeds the RNG, so its initial weights depend on how much randomness
  loading the target used (only the co-located backend loads one). The target-derived parts
  (the embedding copied from the target, the d2t/t2d vocab maps) are kept;
- after the loop, the losses, the draft's initial and final weights and (for our client) its
  ``encoding_stats()`` are saved to OUT.

``colocated`` also swaps the recipe's target loader: upstream's ``NeMoAutoModelForCausalLM``
refuses to run without CUDA, so the same checkpoint is loaded with transformers, which is
what that loader does for a plain HF Llama.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import nemo_automodel.recipes.llm.train_eagle3 as recipe_module
import torch

TARGET_DERIVED = ("model.embed_tokens.weight", "d2t", "t2d")


class _CpuTargetLoader:
    """Stands in for ``NeMoAutoModelForCausalLM`` in the co-located run (see the module doc)."""

    @staticmethod
    def from_pretrained(path: str, torch_dtype: Any = None, force_hf: bool = False, **kwargs: Any) -> Any:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, **kwargs)


def _instrument(out: str) -> None:
    recipe_cls = recipe_module.TrainEagle3Recipe
    losses: list[torch.Tensor] = []
    forward_batch = recipe_cls._forward_batch
    run_loop = recipe_cls.run_train_validation_loop

    def recording_forward_batch(self: Any, batch: Any, target_batch: Any = None) -> Any:
        metrics = forward_batch(self, batch, target_batch)
        losses.append(metrics.loss.detach().clone())
        return metrics

    def instrumented_loop(self: Any) -> Any:
        draft = self.draft_model
        with torch.random.fork_rng(devices=[]):  # leaves the recipe's own RNG stream untouched
            torch.manual_seed(0)
            fresh = type(draft)(draft.config).to(dtype=draft.model.fc.weight.dtype)
        draft.load_state_dict({k: v for k, v in fresh.state_dict().items() if k not in TARGET_DERIVED}, strict=False)
        initial = {k: v.detach().clone() for k, v in draft.state_dict().items()}
        result = run_loop(self)
        torch.save(
            {
                "losses": torch.stack(losses),
                "initial": initial,
                "final": {k: v.detach().clone() for k, v in draft.state_dict().items()},
                "backend": f"{type(self.target_wrapper).__module__}.{type(self.target_wrapper).__qualname__}",
                "encoding": getattr(self.target_wrapper, "encoding_stats", lambda: None)(),
            },
            out,
        )
        return result

    recipe_cls._forward_batch = recording_forward_batch
    recipe_cls.run_train_validation_loop = instrumented_loop


def main() -> None:
    mode, out, recipe_args = sys.argv[1], sys.argv[2], sys.argv[3:]
    rank = os.environ.get("RANK", "0")
    if rank != "0":  # under torchrun each rank saves its own
        out = f"{out}.rank{rank}"
    _instrument(out)
    if mode == "remote":
        from eagle3_client.automodel_launch import main as launch

        launch(recipe_args)
    elif mode == "colocated":
        recipe_module.NeMoAutoModelForCausalLM = _CpuTargetLoader
        sys.argv = [recipe_module.__file__, *recipe_args]
        recipe_module.main()
    else:
        raise SystemExit(f"mode must be 'remote' or 'colocated', not {mode!r}")


if __name__ == "__main__":
    main()
