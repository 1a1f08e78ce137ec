"""Run NeMo AutoModel's ViSpec (stage-2) recipe once, on the CPU, and save what it trained (a test fixture).

    python tests/integration/vispec_recipe_runner.py remote OUT.pt -c recipe.yaml [--key=value ...]
    python tests/integration/vispec_recipe_runner.py colocated OUT.pt -c recipe.yaml [--key=value ...]
    python tests/integration/vispec_recipe_runner.py colocated-sampled OUT.pt -c recipe.yaml [--key=value ...]
    python tests/integration/vispec_recipe_runner.py produce - [eagle3-appliance produce arguments]

``remote`` runs our launcher (``eagle3_client.automodel_launch``), ``colocated`` the recipe module's
own ``main``, which loads the target with ``AutoModelForImageTextToText`` in this process. Both run
upstream's training loop unchanged (forward, backward, optimizer steps); the runner records the
loss of every micro-batch (the recipe's ``_compute_metrics``), the target batches the wrapper
returned, and the draft's weights after the loop. ``colocated-sampled`` is ``colocated`` whose
train loader samples as a stream trainer's does (``stream_train_loader``); ``produce`` runs
``eagle3-appliance produce`` (recipe mode) with the same stand-ins, since it builds the recipe's
processor and data pipeline too.

Two stand-ins for packages this test environment lacks, applied the same way in both modes and
only when the package is missing (with it installed, upstream's own code runs):

* ``qwen_vl_utils``: upstream's VLM collate refuses to run without it, yet the only name it
  imports from it (``process_vision_info``) is not called on the ViSpec collate path; the flag
  that gates it is set.
* ``torchvision``: transformers builds a Qwen-VL processor only with its video processor, which
  needs torchvision. The recipe's ``AutoProcessor`` becomes a loader that builds upstream's
  ``Qwen2_5_VLProcessor`` from the target folder's tokenizer, image processor and chat template,
  without a video processor (the data has no video).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

import torch

from eagle3_client.automodel import VISPEC_RECIPES


class _ImageOnlyProcessorLoader:
    """The recipe's ``AutoProcessor`` without torchvision: a Qwen2.5-VL processor with no video processor."""

    @staticmethod
    def from_pretrained(path: str, **kwargs: Any) -> Any:
        from transformers import AutoImageProcessor, AutoTokenizer, Qwen2_5_VLProcessor

        class ImageOnly(Qwen2_5_VLProcessor):
            def check_argument_for_proper_class(self, argument_name: str, argument: Any) -> Any:
                if argument_name == "video_processor" and argument is None:
                    return None
                return super().check_argument_for_proper_class(argument_name, argument)

        ImageOnly.__name__ = ImageOnly.__qualname__ = Qwen2_5_VLProcessor.__name__  # what the collate keys on
        return ImageOnly(
            image_processor=AutoImageProcessor.from_pretrained(path),
            tokenizer=AutoTokenizer.from_pretrained(path),
            video_processor=None,
            chat_template=(Path(path) / "chat_template.jinja").read_text(),
        )


def _stand_ins(module: Any) -> None:
    if importlib.util.find_spec("qwen_vl_utils") is None:
        collate = importlib.import_module("nemo_automodel.components.datasets.vlm.dspark_collate")
        collate.HAVE_QWEN_VL_UTILS = True  # type: ignore[attr-defined]
    if importlib.util.find_spec("torchvision") is None:
        module.AutoProcessor = _ImageOnlyProcessorLoader


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
        wrapper = self.target_wrapper
        generate = wrapper.generate_batch

        def recording_generate(*args: Any, **kwargs: Any) -> Any:
            result = generate(*args, **kwargs)
            batches.append({k: v.detach().clone() for k, v in vars(result).items()})
            return result

        wrapper.generate_batch = recording_generate
        result = loop(self)
        torch.save(
            {
                "losses": torch.stack(losses),
                "batches": batches,
                "steps": int(self.runtime.global_step),
                "final": {k: v.detach().clone() for k, v in self.draft_model.state_dict().items()},
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
    module = importlib.import_module(VISPEC_RECIPES["TrainVispecRecipe"])
    _stand_ins(module)
    if mode == "produce":
        from eagle3_appliance.cli import app

        app(["produce", *recipe_args])
        return
    _instrument(module.TrainVispecRecipe, out)
    if mode == "remote":
        from eagle3_client.automodel_launch import main as launch

        launch(recipe_args)
    elif mode in ("colocated", "colocated-sampled"):
        if mode == "colocated-sampled":
            from nemo_automodel.components.config._arg_parser import parse_args_and_load_config

            from eagle3_client.automodel_stream_dflash import stream_train_loader

            cfg = parse_args_and_load_config(argv=list(recipe_args))
            module.build_dspark_vlm_dataloader = stream_train_loader(  # type: ignore[attr-defined]
                module.build_dspark_vlm_dataloader, cfg.recipe_args, None, 1, 0
            )
        sys.argv = [module.__file__ or "", *recipe_args]
        module.main()
    else:
        raise SystemExit(f"mode must be 'remote', 'colocated', 'colocated-sampled' or 'produce', not {mode!r}")


if __name__ == "__main__":
    main()
