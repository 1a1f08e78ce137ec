"""Run an EAGLE-1/2 recipe (or ViSpec's stage 1) once, on the CPU, and save what it trained (a test fixture).

    python tests/integration/eagle_recipe_runner.py remote OUT.pt -c recipe.yaml [--key=value ...]
    python tests/integration/eagle_recipe_runner.py colocated OUT.pt -c recipe.yaml [--key=value ...]

The YAML's ``recipe:`` names ``TrainEagle1Recipe``, ``TrainEagle2Recipe`` or ``TrainVispecStage1Recipe``.
``remote`` runs our launcher (``eagle3_client.automodel_launch``), ``colocated`` the recipe module's
own ``main``, which loads the target in this process (the EAGLE-1/2 recipe through transformers,
as ``dflash_recipe_runner.py`` does, because AutoModel's own loader needs CUDA; ViSpec's stage 1
with ``AutoModelForImageTextToText``, its own loader). Upstream's training loop runs unchanged
(forward, backward, optimizer steps). Before it, the draft's weights are reset from a fixed seed
(the target's embeddings kept) and the global RNG is seeded: the EAGLE-1 recipe builds its draft
from the RNG state that loading the target leaves, which differs between the two modes, and its
feature noise draws from the RNG. The runner records the loss of every micro-batch, the target
batches the wrapper returned and the draft's weights after the loop.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

import torch

from eagle3_client.automodel import EAGLE_RECIPES
from tests.integration.dflash_recipe_runner import _CpuTargetLoader

_BASE = EAGLE_RECIPES["TrainEagle1Recipe"]  # where TrainEagle1Recipe (every one's base) is defined


def _instrument(recipe_cls: type, out: str) -> None:
    losses: list[torch.Tensor] = []
    batches: list[dict[str, torch.Tensor]] = []
    compute = recipe_cls._compute_metrics
    loop = recipe_cls.run_train_validation_loop

    def recording_compute(self: Any, batch: Any) -> Any:
        metrics = compute(self, batch)
        losses.append(metrics.loss.detach().clone())
        return metrics

    def instrumented_loop(self: Any) -> Any:
        draft = self.draft_model
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            fresh = type(draft)(draft.config).to(dtype=next(draft.parameters()).dtype)
        own = {k: v for k, v in draft.state_dict().items() if "embed_tokens" in k}
        draft.load_state_dict({**fresh.state_dict(), **own})  # in place: the optimizer keeps its parameters
        torch.manual_seed(1)
        wrapper = self.target_wrapper
        generate = wrapper.generate_batch

        def recording_generate(*args: Any, **kwargs: Any) -> Any:
            result = generate(*args, **kwargs)
            batches.append({k: v.detach().clone() for k, v in vars(result).items() if v is not None})
            return result

        wrapper.generate_batch = recording_generate
        result = loop(self)
        torch.save(
            {
                "losses": torch.stack(losses),
                "batches": batches,
                "steps": int(self.runtime.global_step),
                "final": {k: v.detach().clone() for k, v in draft.state_dict().items()},
                "backend": f"{type(wrapper).__module__}.{type(wrapper).__qualname__}",
                "target_model": type(self.target_model).__name__,
            },
            out,
        )
        return result

    recipe_cls._compute_metrics = recording_compute
    recipe_cls.run_train_validation_loop = instrumented_loop


def main() -> None:
    mode, out, recipe_args = sys.argv[1], sys.argv[2], sys.argv[3:]
    base = importlib.import_module(_BASE)
    _instrument(base.TrainEagle1Recipe, out)  # every one of these recipes inherits its loop from it
    if mode == "remote":
        from eagle3_client.automodel_launch import main as launch

        launch(recipe_args)
    elif mode == "colocated":
        from nemo_automodel.components.config._arg_parser import parse_args_and_load_config

        from eagle3_client.automodel_launch import recipe_name

        name = recipe_name(parse_args_and_load_config(argv=list(recipe_args)))
        base.NeMoAutoModelForCausalLM = _CpuTargetLoader  # type: ignore[attr-defined]
        module = importlib.import_module(EAGLE_RECIPES[name])
        sys.argv = [module.__file__ or "", *recipe_args]
        module.main()
    else:
        raise SystemExit(f"mode must be 'remote' or 'colocated', not {mode!r}")


if __name__ == "__main__":
    main()
