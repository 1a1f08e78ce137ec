"""Run a NeMo AutoModel DFlash-family recipe once, on the CPU, and save its losses (a test fixture).

    python tests/integration/dflash_recipe_runner.py remote OUT.pt -c recipe.yaml [--key=value ...]
    python tests/integration/dflash_recipe_runner.py colocated OUT.pt -c recipe.yaml [--key=value ...]
    python tests/integration/dflash_recipe_runner.py colocated-sampled OUT.pt -c recipe.yaml [--key=value ...]

``remote`` runs our launcher (``eagle3_client.automodel_launch.main``), ``colocated`` the recipe
module's own ``main`` (the YAML's ``recipe:`` names which). Both get the same instruments, none
of which changes what a step computes: ``_run_trainer_step`` is wrapped to record each
micro-batch's loss, and before the loop the draft's weights are reset from a fixed seed (the
recipe builds its draft after loading the target, and only the co-located run loads one, so the
random streams differ there). ``colocated`` loads the target with transformers instead of
``NeMoAutoModelForCausalLM``, which refuses to run without CUDA; for a plain HF checkpoint that
is what that loader does.

``colocated-sampled`` is ``colocated`` whose train loader samples as a stream trainer's does
(a ``DistributedSampler`` for the one rank, ``shuffle`` from ``recipe_args.train_shuffle``:
:func:`eagle3_client.automodel_stream_dflash.stream_train_loader`): upstream's single-process
DFlash recipe shuffles with the global RNG, an order no producer can know, so this is the
co-located run a stream run is compared with. Only the order of the batches changes.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

import torch
from nemo_automodel.components.config._arg_parser import parse_args_and_load_config

from eagle3_client.automodel import DFLASH_RECIPES


class _CpuTargetLoader:
    @staticmethod
    def from_pretrained(path: str, torch_dtype: Any = None, force_hf: bool = False, **kwargs: Any) -> Any:
        from transformers import AutoModelForCausalLM

        kwargs.pop("attn_implementation", None)
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype or torch.float32)


def _instrument(recipe_cls: type, out: str) -> None:
    losses: list[torch.Tensor] = []
    documents: list[int] = []  # the most documents one row of each step's batch held (0: unpacked)
    run_step = recipe_cls._run_trainer_step
    run_loop = recipe_cls.run_train_validation_loop

    def recording_step(self: Any, target_batch: Any) -> Any:
        metrics = run_step(self, target_batch)
        losses.append(metrics.loss.detach().clone())
        seq_lens = getattr(target_batch, "seq_lens", None)
        documents.append(0 if seq_lens is None else int((seq_lens > 0).sum(1).max()))
        return metrics

    def instrumented_loop(self: Any) -> Any:
        draft = self.draft_model
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            fresh = type(draft)(draft.config).to(dtype=next(draft.parameters()).dtype)
        draft.load_state_dict(fresh.state_dict())
        result = run_loop(self)
        torch.save(
            {
                "losses": torch.stack(losses),
                "documents": documents,
                "final": {k: v.detach().clone() for k, v in draft.state_dict().items()},
                "backend": f"{type(self.target_wrapper).__module__}.{type(self.target_wrapper).__qualname__}",
                "target_model": type(self.target_model).__name__,
            },
            out,
        )
        return result

    recipe_cls._run_trainer_step = recording_step
    recipe_cls.run_train_validation_loop = instrumented_loop


def main() -> None:
    mode, out, recipe_args = sys.argv[1], sys.argv[2], sys.argv[3:]
    name = str(parse_args_and_load_config(argv=list(recipe_args)).get("recipe"))
    module = importlib.import_module(DFLASH_RECIPES[name])
    _instrument(getattr(module, name), out)
    if mode == "remote":
        from eagle3_client.automodel_launch import main as launch

        launch(recipe_args)
    elif mode in ("colocated", "colocated-sampled"):
        dflash = importlib.import_module(DFLASH_RECIPES["TrainDFlashRecipe"])
        dflash.NeMoAutoModelForCausalLM = _CpuTargetLoader  # type: ignore[attr-defined]
        if mode == "colocated-sampled":
            from eagle3_client.automodel_stream_dflash import stream_train_loader

            cfg = parse_args_and_load_config(argv=list(recipe_args))
            dflash.build_eagle3_dataloader = stream_train_loader(  # type: ignore[attr-defined]
                dflash.build_eagle3_dataloader, cfg.recipe_args, None, 1, 0
            )
        sys.argv = [module.__file__ or "", *recipe_args]
        module.main()
    else:
        raise SystemExit(f"mode must be 'remote', 'colocated' or 'colocated-sampled', not {mode!r}")


if __name__ == "__main__":
    main()
