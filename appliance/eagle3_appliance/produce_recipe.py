"""``eagle3-appliance produce -c recipe.yaml``: the batches a recipe would feed its target, as runs.

Builds the recipe's own data pipeline with NeMo AutoModel's code: the YAML parsed by its parser,
the target's tokenizer and chat template (``NeMoAutoTokenizer``), the chat dataset, packing
(``packed_sequence_size``), ``micro_batch_size``, ``shuffle_seed``, and the draft vocabulary
(``load_or_build_eagle3_token_mapping``, counted over every rank's share as the recipe's ranks
all-reduce it; ``selected_token_ids_path`` is read or written as the recipe does). Each epoch
of each data-parallel rank becomes one run, ``<run>.e<epoch>.r<rank>``
(:func:`eagle3_client.automodel_stream.stream_run_id`), holding that rank's batches of that
epoch in its ``DistributedSampler`` order, as a trainer started with ``target_model_backend:
stream`` reads them.

A DFlash-family YAML (``recipe: TrainDFlashRecipe``, ``TrainDFlash2Recipe``, ``TrainJetSpecRecipe``,
``TrainDominoRecipe``) gets the same batches (the family builds its loader with the same
``build_eagle3_dataloader``) and no draft vocabulary (``vocab_mapping`` is ``None``); its capture
is the producer's ``--capture dflash:...`` (the layers the recipe logs). Upstream's DFlash recipe
always shuffles and has no ``train_shuffle`` key; its stream backend reads that key
(:mod:`eagle3_client.automodel_stream_dflash`), with the same default (true), as this does.

A ViSpec (stage 2) YAML (``TrainVispecRecipe``) gets its own VLM pipeline: the recipe module's
``AutoProcessor`` with its pixel bounds and ``build_dspark_vlm_dataloader`` over the YAML's
``dataset``, sampled as above; each batch carries its vision tensors, and the capture is
``--capture vispec``. The producer holds a run's batches, pixels included, in memory while it runs.

A DSpark YAML (``TrainDSparkRecipe``, a text target) gets the same batches too (its text loader
is the same ``build_eagle3_dataloader``), no draft vocabulary, and the capture ``--capture
dspark:...``. ``multimodal: true`` (its own VLM loader, vision inputs) and ``cached_target_path``
(no target) are refused.

One choice differs from a co-located run: with ``trainers = 1`` and ``train_shuffle: true`` the
order is drawn from ``DistributedSampler``'s seed and the epoch, not from the trainer's RNG (which
the producer cannot see), so such a run sees the same samples per epoch in another order than a
co-located one; with ``train_shuffle: false``, or several trainers, it is the recipe's order.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from eagle3_client.automodel import DFLASH_RECIPES, DSPARK_RECIPES, VISPEC_RECIPES
from eagle3_client.automodel_launch import recipe_name
from eagle3_client.automodel_stream import stream_run_id
from eagle3_client.automodel_stream_dflash import RankMesh
from eagle3_client.capture import CAPTURE_DFLASH, CAPTURE_DSPARK, CAPTURE_EAGLE3, CAPTURE_VISPEC
from eagle3_client.streaming.producer import RunPlan

__all__ = ["RecipeRuns", "recipe_runs"]


@dataclass
class RecipeRuns:
    """What a recipe's producer needs: one run per epoch and rank, and the draft vocabulary."""

    plans: list[RunPlan]
    vocab_mapping: tuple[torch.Tensor, torch.Tensor] | None  # None: a DFlash-family or DSpark recipe
    epochs: int
    trainers: int
    recipe: str = "TrainEagle3Recipe"

    @property
    def capture_kind(self) -> str:
        """The capture kind the recipe's trainer reads (``eagle3``, ``dflash``, ``dspark`` or ``vispec``)."""
        if self.recipe in DFLASH_RECIPES:
            return CAPTURE_DFLASH
        if self.recipe in VISPEC_RECIPES:
            return CAPTURE_VISPEC
        return CAPTURE_DSPARK if self.recipe in DSPARK_RECIPES else CAPTURE_EAGLE3


class _Chain:
    """Every rank's batches one after the other: the counts the recipe's ranks all-reduce."""

    def __init__(self, loaders: Sequence[Any]) -> None:
        self._loaders = loaders

    def __iter__(self) -> Iterator[Any]:
        for loader in self._loaders:
            yield from loader

    def __len__(self) -> int:
        return sum(len(loader) for loader in self._loaders)


def recipe_runs(config: str, overrides: Sequence[str], run_id: str, trainers: int) -> RecipeRuns:
    """The runs of the recipe at ``config`` (with ``--key=value`` ``overrides``) for ``trainers`` ranks."""
    from nemo_automodel.components.config._arg_parser import parse_args_and_load_config
    from nemo_automodel.components.datasets.llm.eagle3 import build_eagle3_dataloader
    from nemo_automodel.recipes.llm.train_eagle3 import NeMoAutoTokenizer
    from transformers import AutoConfig

    if trainers < 1:
        raise ValueError(f"--trainers must be at least 1, got {trainers}")
    cfg = parse_args_and_load_config(argv=["-c", config, *overrides])
    recipe = recipe_name(cfg)
    rc = cfg.recipe_args
    if recipe in DSPARK_RECIPES and (rc.get("multimodal", False) or rc.get("cached_target_path", None)):
        raise ValueError(
            f"{recipe} with multimodal: true or cached_target_path has no stream backend (its batches are not "
            "the text loader's); train it with target_model_backend: remote"
        )
    target = rc.target_model_name_or_path
    trust = bool(rc.get("trust_remote_code", False))
    epochs = int(rc.get("num_epochs", 1))
    if recipe in VISPEC_RECIPES:
        return _runs(_vispec_loaders(cfg, trainers), None, run_id, epochs, trainers, recipe)
    tokenizer = NeMoAutoTokenizer.from_pretrained(target, trust_remote_code=trust)
    target_config = AutoConfig.from_pretrained(target, trust_remote_code=trust)
    base = getattr(target_config, "text_config", None) or target_config
    loaders = [
        build_eagle3_dataloader(
            data_path=rc.train_data_path,
            tokenizer=tokenizer,
            seq_length=rc.seq_length,
            batch_size=rc.micro_batch_size,
            shuffle=rc.get("train_shuffle", True),
            num_workers=0,
            split=rc.get("train_split", None),
            distributed=True,  # a DistributedSampler even for one rank: an order the producer can know
            shuffle_seed=rc.get("shuffle_seed", 42),
            mask_reasoning_content=rc.get("mask_reasoning_content", False),
            mask_generation_prompt=rc.get("mask_generation_prompt", False),
            packed_sequence_size=rc.get("packed_sequence_size", 0),
            dp_mesh=RankMesh(trainers, rank),
        )
        for rank in range(trainers)
    ]
    mapping = None
    if recipe not in DFLASH_RECIPES and recipe not in DSPARK_RECIPES:
        mapping = _vocab_mapping(loaders, tokenizer, base, rc)
    return _runs(loaders, mapping, run_id, epochs, trainers, recipe)


def _runs(
    loaders: Sequence[Any],
    mapping: tuple[torch.Tensor, torch.Tensor] | None,
    run_id: str,
    epochs: int,
    trainers: int,
    recipe: str,
) -> RecipeRuns:
    """One run per epoch and rank: that rank's batches of that epoch, in its sampler's order."""
    plans = []
    for epoch in range(epochs):
        for rank, loader in enumerate(loaders):
            loader.sampler.set_epoch(epoch)
            batches = [dict(batch) for batch in loader]
            plans.append(RunPlan(stream_run_id(run_id, epoch, rank), [(f"b{i:08d}", b) for i, b in enumerate(batches)]))
    return RecipeRuns(plans, mapping, epochs, trainers, recipe)


def _vispec_loaders(cfg: Any, trainers: int) -> list[Any]:
    """The ViSpec recipe's train loader of each rank, built by its own module's names (as its setup does)."""
    import importlib

    module = importlib.import_module(VISPEC_RECIPES["TrainVispecRecipe"])
    rc = cfg.recipe_args
    if int(rc.micro_batch_size) != 1:
        raise ValueError(f"ViSpec training requires recipe_args.micro_batch_size=1 (got {rc.micro_batch_size})")
    trust = bool(rc.get("trust_remote_code", False))
    processor = module.AutoProcessor.from_pretrained(rc.target_model_name_or_path, trust_remote_code=trust)
    module.set_image_pixel_bounds(
        processor, max_pixels=rc.get("image_max_pixels", None), min_pixels=rc.get("image_min_pixels", None)
    )
    return [
        module.build_dspark_vlm_dataloader(
            dataset_cfg=cfg.dataset,
            processor=processor,
            batch_size=1,
            max_length=rc.seq_length,
            shuffle=rc.get("train_shuffle", True),
            num_workers=0,
            distributed=True,  # a DistributedSampler even for one rank: an order the producer can know
            dp_mesh=RankMesh(trainers, rank),
            inject_fake_image=False,
        )
        for rank in range(trainers)
    ]


def _vocab_mapping(loaders: Sequence[Any], tokenizer: Any, base: Any, rc: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The EAGLE-3 recipe's draft vocabulary, counted over every rank's share."""
    from nemo_automodel.components.datasets.llm.eagle3 import load_or_build_eagle3_token_mapping

    special = [getattr(tokenizer, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")]
    ids, mask = load_or_build_eagle3_token_mapping(
        _Chain(loaders),
        target_vocab_size=base.vocab_size,
        draft_vocab_size=rc.get("draft_vocab_size", None),
        special_token_ids=special,
        cache_path=rc.get("selected_token_ids_path", None),
    )
    return ids, mask
