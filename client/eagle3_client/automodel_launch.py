"""Run NeMo AutoModel's EAGLE-3 or DFlash-family recipe with this package's client as its remote target.

Takes exactly the arguments of ``python -m nemo_automodel.recipes.llm.train_eagle3``: a
YAML (``-c``/``--config``) and ``--dotted.key=value`` overrides. It parses them with
AutoModel's own parser, applies :func:`eagle3_client.automodel.install` with the options found in
``recipe_args`` or the environment, then does what the recipe's ``main`` does (build the
recipe, ``setup()``, ``run_train_validation_loop()``). Under ``torchrun`` every rank does the
same. ``target_model_backend: stream`` trains from a supervision stream (the EAGLE-3 recipe:
:mod:`eagle3_client.automodel_stream`; the DFlash family: :mod:`eagle3_client.automodel_stream_dflash`).
The YAML's ``recipe:`` key picks the recipe:
``TrainEagle3Recipe`` (the default), or one of the DFlash family (``TrainDFlashRecipe``,
``TrainDFlash2Recipe``, ``TrainJetSpecRecipe``, ``TrainDominoRecipe``), run through
:func:`eagle3_client.automodel.remote_dflash_recipe`, ``TrainDSparkRecipe``, run through
:func:`eagle3_client.automodel.remote_dspark_recipe`, ViSpec's stage 2, ``TrainVispecRecipe``, run
through :func:`eagle3_client.automodel.remote_vispec_recipe`, or EAGLE-1/EAGLE-2 and ViSpec's stage 1
(``TrainEagle1Recipe``, ``TrainEagle2Recipe``, ``TrainVispecStage1Recipe``), run through
:func:`eagle3_client.automodel.remote_eagle_recipe`. Every one takes ``target_model_backend: remote``
and all but EAGLE-1/2 also ``stream`` (streams carry no EAGLE-1/2 captures). Usage::

    python -m eagle3_client.automodel_launch -c recipe.yaml --recipe_args.remote_urls='["http://node3:8001"]'
    torchrun --nproc-per-node=8 -m eagle3_client.automodel_launch -c recipe.yaml
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["build_recipe", "check_config", "main", "recipe_name"]

logger = logging.getLogger("eagle3_client.automodel_launch")

_RECIPE = "TrainEagle3Recipe"
_USAGE = __doc__.split("Usage::", 1)[1]


def recipe_name(cfg: Any) -> str:
    """The recipe class the YAML names (``recipe:``), ``TrainEagle3Recipe`` when it names none."""
    recipe = cfg.get("recipe", None)
    return _RECIPE if recipe is None else str(getattr(recipe, "__name__", recipe)).rsplit(".", 1)[-1]


def check_config(cfg: Any) -> None:
    """Refuse a YAML written for another recipe; warn when it does not use the remote backend."""
    from eagle3_client.automodel import DFLASH_RECIPES, DSPARK_RECIPES, EAGLE_RECIPES, VISPEC_RECIPES

    name = recipe_name(cfg)
    known = (DFLASH_RECIPES, DSPARK_RECIPES, VISPEC_RECIPES, EAGLE_RECIPES)
    if name != _RECIPE and not any(name in recipes for recipes in known):
        raise SystemExit(
            f"this launcher runs the EAGLE-3 recipe ({_RECIPE}), a DFlash-family recipe "
            f"({', '.join(DFLASH_RECIPES)}), DSpark's ({', '.join(DSPARK_RECIPES)}), ViSpec's "
            f"({', '.join(VISPEC_RECIPES)}) or an EAGLE-1/2 one ({', '.join(EAGLE_RECIPES)}); "
            f"the YAML asks for {cfg.get('recipe', None)!r}"
        )
    recipe_args = cfg.get("recipe_args", None)
    if recipe_args is None:
        raise SystemExit("the YAML has no recipe_args section")
    backend = recipe_args.get("target_model_backend", "colocated")
    if backend == "stream" and name in EAGLE_RECIPES:
        raise SystemExit(f"streams carry no EAGLE-1/2 captures: train {name} with target_model_backend: remote")
    if backend not in ("remote", "stream"):
        logger.warning(
            "recipe_args.target_model_backend is %r: the eagle3-appliance client is used only with 'remote' "
            "or 'stream'",
            backend,
        )


def build_recipe(argv: Sequence[str]) -> Any:
    """Parse like the recipe, install our client, build the recipe the YAML names and ``setup()`` it."""
    # Imported here so that ``--help`` does not wait for AutoModel's imports.
    from nemo_automodel.components.config._arg_parser import parse_args_and_load_config

    from eagle3_client.automodel import DSPARK_RECIPES, EAGLE_RECIPES, VISPEC_RECIPES, install, options_from_config

    cfg = parse_args_and_load_config(argv=list(argv))
    check_config(cfg)
    options = options_from_config(cfg.get("recipe_args", None))
    name = recipe_name(cfg)
    if name == _RECIPE:
        installation = install(options)
        from nemo_automodel.recipes.llm.train_eagle3 import TrainEagle3Recipe

        installation.patch_recipe()  # packed_sequence_size > 0 with our backend
        from eagle3_client.automodel_stream import patch_recipe_for_stream

        patch_recipe_for_stream(TrainEagle3Recipe, lambda: dict(options))  # target_model_backend: stream
        recipe_cls: type = TrainEagle3Recipe
    elif name in DSPARK_RECIPES:
        import importlib

        from eagle3_client.automodel import remote_dspark_recipe

        recipe_cls = remote_dspark_recipe(getattr(importlib.import_module(DSPARK_RECIPES[name]), name), options)
    elif name in VISPEC_RECIPES:
        import importlib

        from eagle3_client.automodel import remote_vispec_recipe

        recipe_cls = remote_vispec_recipe(getattr(importlib.import_module(VISPEC_RECIPES[name]), name), options)
    elif name in EAGLE_RECIPES:
        import importlib

        from eagle3_client.automodel import remote_eagle_recipe

        recipe_cls = remote_eagle_recipe(getattr(importlib.import_module(EAGLE_RECIPES[name]), name), options)
    else:
        import importlib

        from eagle3_client.automodel import DFLASH_RECIPES, remote_dflash_recipe

        recipe_cls = remote_dflash_recipe(getattr(importlib.import_module(DFLASH_RECIPES[name]), name), options)
    recipe = recipe_cls(cfg)
    recipe.setup()
    wrapper = getattr(recipe, "target_wrapper", None)
    logger.info(
        "target backend: %s.%s %s",
        type(wrapper).__module__,
        type(wrapper).__qualname__,
        getattr(wrapper, "urls", ""),
    )
    return recipe


def main(argv: Sequence[str] | None = None) -> None:
    """``build_recipe`` from the command line, then train (the recipe's ``main``, with our client)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(f"usage:{_USAGE}", end="")
        raise SystemExit(0 if args else 2)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    build_recipe(args).run_train_validation_loop()


if __name__ == "__main__":
    main()
