"""Run NeMo AutoModel's DSpark recipe once, on the CPU, and save its losses (a test fixture).

    python tests/integration/dspark_recipe_runner.py remote OUT.pt -c recipe.yaml [--key=value ...]
    python tests/integration/dspark_recipe_runner.py colocated OUT.pt -c recipe.yaml [--key=value ...]
    python tests/integration/dspark_recipe_runner.py colocated-sampled OUT.pt -c recipe.yaml [--key=value ...]

As ``dflash_recipe_runner.py``: ``remote`` runs our launcher, ``colocated`` the recipe module's
own ``main`` with the target loaded by transformers (``colocated-sampled``: its train loader
sampling as a stream trainer's does, as in ``dflash_recipe_runner.py``). The draft's weights are reset from a fixed
seed, then, instead of the training loop (the recipe's FlexAttention has no backward on the CPU),
the recipe's own ``_forward_batch`` runs on the first :data:`BATCHES` training batches without
gradients: the losses, the draft's weights (embeddings and LM head copied from the target) and
the target batches are saved.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

import torch

from eagle3_client.automodel import DSPARK_RECIPES
from tests.integration.dflash_recipe_runner import _CpuTargetLoader

BATCHES = 3


def _instrument(recipe_cls: type, out: str) -> None:
    losses: list[torch.Tensor] = []
    documents: list[int] = []  # the most documents one row of each step's batch held (0: unpacked)
    forward = recipe_cls._forward_batch

    def recording_forward(self: Any, batch: Any) -> Any:
        metrics = forward(self, batch)
        losses.append(metrics.loss.detach().clone())
        seq_lens = batch.get("seq_lens")
        documents.append(0 if seq_lens is None else int((seq_lens > 0).sum(1).max()))
        return metrics

    def instrumented_loop(self: Any) -> Any:
        draft = self.draft_model
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            fresh = type(draft)(draft.config).to(dtype=next(draft.parameters()).dtype)
        own = {k: v for k, v in draft.state_dict().items() if "embed_tokens" in k or "lm_head" in k}
        draft.load_state_dict({**fresh.state_dict(), **own})  # the target's copies stay
        hidden: list[torch.Tensor] = []
        wrapper = self.target_wrapper
        generate = wrapper.generate_batch

        def recording_generate(*args: Any, **kwargs: Any) -> Any:
            batch = generate(*args, **kwargs)
            hidden.extend([batch.target_hidden_states, batch.target_last_hidden_states])
            return batch

        wrapper.generate_batch = recording_generate
        with torch.no_grad():
            for step, batch in enumerate(self.train_dataloader):
                if step == BATCHES:
                    break
                self._forward_batch(batch)
        torch.save(
            {
                "losses": torch.stack(losses),
                "documents": documents,
                "hidden": hidden,
                "final": {k: v.detach().clone() for k, v in draft.state_dict().items()},
                "backend": f"{type(wrapper).__module__}.{type(wrapper).__qualname__}",
                "target_model": type(self.target_model).__name__,
            },
            out,
        )

    recipe_cls._forward_batch = recording_forward
    recipe_cls.run_train_validation_loop = instrumented_loop


def main() -> None:
    mode, out, recipe_args = sys.argv[1], sys.argv[2], sys.argv[3:]
    module = importlib.import_module(DSPARK_RECIPES["TrainDSparkRecipe"])
    _instrument(module.TrainDSparkRecipe, out)
    if mode == "remote":
        from eagle3_client.automodel_launch import main as launch

        launch(recipe_args)
    elif mode in ("colocated", "colocated-sampled"):
        module.NeMoAutoModelForCausalLM = _CpuTargetLoader  # type: ignore[attr-defined]
        if mode == "colocated-sampled":  # the train loader samples as a stream trainer's does
            from nemo_automodel.components.config._arg_parser import parse_args_and_load_config

            from eagle3_client.automodel_stream_dflash import stream_train_loader

            cfg = parse_args_and_load_config(argv=list(recipe_args))
            module.build_eagle3_dataloader = stream_train_loader(  # type: ignore[attr-defined]
                module.build_eagle3_dataloader, cfg.recipe_args, None, 1, 0
            )
        sys.argv = [module.__file__ or "", *recipe_args]
        module.main()
    else:
        raise SystemExit(f"mode must be 'remote', 'colocated' or 'colocated-sampled', not {mode!r}")


if __name__ == "__main__":
    main()
