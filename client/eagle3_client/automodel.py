"""Make NeMo AutoModel's EAGLE-3 recipe use this client for ``target_model_backend: remote``.

The recipe (``nemo_automodel.recipes.llm.train_eagle3``) builds its remote backend by name:
it imports ``RemoteEagle3TargetModel`` from ``nemo_automodel.components.speculative.eagle.remote``
when the module is first imported, and later calls ``RemoteEagle3TargetModel.from_urls(urls,
device=..., timeout=recipe_args.remote_timeout, max_retries=recipe_args.remote_max_retries)``.
:func:`install` rebinds that one name, in the ``remote`` package (so a recipe imported later
picks it up) and in the recipe module if it is already imported, to a subclass of our
:class:`~eagle3_client.backend.RemoteEagle3TargetModel` that adds the options below. Nothing else
in AutoModel changes, and :meth:`Installation.uninstall` puts upstream's class back.

Our options: every client option that has an environment variable can also be set in the
recipe YAML as ``recipe_args.remote_<name>`` (``remote_data_plane``, ``remote_encoding``,
``remote_auth_token``, ``remote_lease_seconds``, ...; the table is in the docs'
client-options page, generated from :mod:`eagle3_client.options`). The YAML, including
``--recipe_args.KEY=VALUE`` overrides, wins over the environment; unset means the client's
default.

Packing: the recipe refuses ``packed_sequence_size > 0`` with any target but the co-located
one. With our client installed it trains packed rows through our appliances (which run them
as the co-located target does); :mod:`eagle3_client.automodel_packing` lifts that gate for our
backend alone: :func:`install` applies it when the recipe module is already imported, and
:meth:`Installation.patch_recipe` once it is (the launcher calls it).

Prefetch depth: the recipe caps ``target_prefetch_depth`` at ``num_remote_servers`` (one
request in flight per server). Our subclass reports servers x ``max_in_flight_per_server``
there, so the recipe can keep every request slot of the fleet busy.

The DFlash family (``TrainDFlashRecipe`` and its subclasses DFlash 2, JetSpec, Domino) has no
remote backend upstream: it always loads the target itself. :func:`remote_dflash_recipe` makes
a subclass of any of them that, with the same YAML switch (``target_model_backend: remote``,
``remote_urls``, ``remote_<option>``), loads no target weights: its target model is the
config alone, the wrapper is :class:`~eagle3_client.dflash.RemoteDFlashTargetModel` with the
layers (and logits) the recipe's own wrapper asked for, and the embeddings and LM head the
draft reuses are fetched from the servers. These recipes pack rows themselves
(``packed_sequence_size``, no gate to lift): the wrapper sends the packing, which every server
must have granted, and context parallelism stays refused (it shards a co-located target).

DSpark, ViSpec (stage 2), EAGLE-1/EAGLE-2 and ViSpec's stage 1 build their target inline in
``setup()``: :func:`remote_dspark_recipe`, :func:`remote_vispec_recipe` and
:func:`remote_eagle_recipe` swap the names that ``setup()`` reads for that one call (one
mechanism, ``_swapping_recipe``), with the same YAML switch.

Usage (what :mod:`eagle3_client.automodel_launch` does)::

    from eagle3_client.automodel import install, options_from_config
    installation = install(options_from_config(cfg.recipe_args))
    from nemo_automodel.recipes.llm.train_eagle3 import TrainEagle3Recipe
    installation.patch_recipe()  # packed_sequence_size with our backend

    recipe_cls = remote_dflash_recipe(TrainJetSpecRecipe)   # the DFlash family
"""

from __future__ import annotations

import importlib
import logging
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from eagle3_client.automodel_packing import patch_recipe
from eagle3_client.automodel_stream import STREAM_BACKEND, StreamSettings
from eagle3_client.automodel_stream_dflash import (
    StreamDFlashTarget,
    StreamDSparkTarget,
    StreamVispecTarget,
    stream_train_loader,
)
from eagle3_client.backend import RemoteEagle3TargetModel
from eagle3_client.dflash import RemoteDFlashTargetModel
from eagle3_client.dspark import RemoteDSparkTargetModel
from eagle3_client.eagle import RemoteEagleTargetModel
from eagle3_client.options import ClientOptions, checked_value, option_fields, recipe_key
from eagle3_client.vispec import RemoteVispecTargetModel

__all__ = [
    "DFLASH_RECIPES",
    "DSPARK_RECIPES",
    "EAGLE_RECIPES",
    "RECIPE_MODULE",
    "REMOTE_PACKAGE",
    "VISPEC_RECIPES",
    "ConfigOnlyTarget",
    "Installation",
    "configured_backend",
    "install",
    "options_from_config",
    "remote_dflash_recipe",
    "remote_dspark_recipe",
    "remote_eagle_recipe",
    "remote_vispec_recipe",
]

logger = logging.getLogger(__name__)

# Where the recipe resolves the backend class from, and the recipe module itself.
REMOTE_PACKAGE = "nemo_automodel.components.speculative.eagle.remote"
RECIPE_MODULE = "nemo_automodel.recipes.llm.train_eagle3"
_CLASS_NAME = "RemoteEagle3TargetModel"
# The DFlash family's recipes: class name -> module (each subclasses TrainDFlashRecipe).
DFLASH_RECIPES = {
    "TrainDFlashRecipe": "nemo_automodel.recipes.llm.train_dflash",
    "TrainDFlash2Recipe": "nemo_automodel.recipes.llm.train_dflash2",
    "TrainJetSpecRecipe": "nemo_automodel.recipes.llm.train_jetspec",
    "TrainDominoRecipe": "nemo_automodel.recipes.llm.train_domino",
}
# DSpark's recipe: class name -> module.
DSPARK_RECIPES = {"TrainDSparkRecipe": "nemo_automodel.recipes.llm.train_dspark"}
# ViSpec's stage-2 (vision-aware) recipe: class name -> module.
VISPEC_RECIPES = {"TrainVispecRecipe": "nemo_automodel.recipes.llm.train_vispec"}
# The recipes whose target is upstream's HFEagleTargetModel (EAGLE-1, EAGLE-2 and ViSpec's text-only
# stage 1 with a vision-language target): class name -> module.
EAGLE_RECIPES = {
    "TrainEagle1Recipe": "nemo_automodel.recipes.llm.train_eagle1",
    "TrainEagle2Recipe": "nemo_automodel.recipes.llm.train_eagle2",
    "TrainVispecStage1Recipe": "nemo_automodel.recipes.llm.train_vispec",
}
# The name each such recipe's setup() loads its target with, by the module that defines that setup()
# (TrainEagle2Recipe inherits TrainEagle1Recipe's).
_EAGLE_TARGET_LOADERS = {
    "nemo_automodel.recipes.llm.train_eagle1": "NeMoAutoModelForCausalLM",
    "nemo_automodel.recipes.llm.train_vispec": "AutoModelForImageTextToText",
}


def options_from_config(recipe_args: Any = None) -> dict[str, Any]:
    """Client keyword arguments from ``recipe_args.remote_<name>`` (a ConfigNode or a mapping).

    Empty values count as unset (the client then reads the option's environment variable). A
    value the client would refuse is a ``ValueError`` naming its key, before anything runs; so
    is a combination it would refuse (``probe_max_interval`` below ``probe_interval``, with the
    environment filling in what the YAML leaves unset), in the client's own words.
    """
    kwargs: dict[str, Any] = {}
    for f in option_fields():
        key = recipe_key(f)
        value = _lookup(recipe_args, key) if key is not None else None
        if value is None or str(value).strip() == "":
            continue
        try:
            checked_value(f, value)
        except ValueError as exc:
            raise ValueError(f"recipe_args.{key}: {exc}") from None
        kwargs[f.name] = value
    ClientOptions.resolve(**kwargs)  # then together, as the client will resolve them
    return kwargs


def _lookup(recipe_args: Any, key: str) -> Any:
    if recipe_args is None:
        return None
    getter = getattr(recipe_args, "get", None)  # ConfigNode and Mapping both have .get
    return getter(key, None) if getter is not None else None


def configured_backend(options: Mapping[str, Any] | None = None) -> type[RemoteEagle3TargetModel]:
    """Our client class with ``options`` (client keywords) applied by ``from_urls`` (the recipe's constructor)."""
    extra = dict(options or {})

    class AutoModelRemoteTarget(RemoteEagle3TargetModel):
        """``eagle3_client.RemoteEagle3TargetModel`` as built by NeMo AutoModel's EAGLE-3 recipe."""

        @classmethod
        def from_urls(cls, urls: Any, **kwargs: Any) -> RemoteEagle3TargetModel:
            # Arguments the recipe passes win over ours.
            return super().from_urls(_url_list(urls), **{**extra, **kwargs})

        @property
        def num_remote_servers(self) -> int:
            """Request slots (servers x ``max_in_flight_per_server``), which is what the recipe uses it for.

            The recipe reads this only to cap ``target_prefetch_depth`` at "one in-flight
            request per server", a rule that keeps upstream's NCCL receives in order. This
            client orders every data plane itself, so the cap becomes the requests it can
            keep in flight.
            """
            return int(super().num_remote_servers) * self.options.max_in_flight_per_server

    AutoModelRemoteTarget.__qualname__ = AutoModelRemoteTarget.__name__  # readable in logs
    return AutoModelRemoteTarget


def _url_list(urls: Any) -> list[str] | str:
    """The recipe's ``list(recipe_args.remote_urls)`` as URLs.

    A YAML string instead of a list (``remote_urls: http://a:8001,http://b:8001``, or a CLI
    override the recipe's parser leaves as text) reaches us split into single characters;
    no list of real URLs looks like that, so it is joined back into the comma-separated
    string the client accepts.
    """
    if isinstance(urls, str):
        return urls
    items = [str(u) for u in urls]
    if len(items) > 1 and all(len(u) == 1 for u in items):
        return "".join(items)
    return items


@dataclass
class Installation:
    """An applied :func:`install`; ``uninstall()`` (or leaving the ``with`` block) reverts it."""

    backend: type[RemoteEagle3TargetModel]
    options: dict[str, Any]
    upstream: type
    _undo_recipe: Callable[[], None] | None = None

    def patch_recipe(self) -> None:
        """Lift the recipe's co-located-only packing gate for our backend (once the recipe is imported)."""
        module = sys.modules.get(RECIPE_MODULE)
        if module is None or self._undo_recipe is not None:
            return

        def is_ours() -> bool:  # any installation's class, not only this one's
            bound = getattr(module, _CLASS_NAME, None)
            return isinstance(bound, type) and issubclass(bound, RemoteEagle3TargetModel)

        self._undo_recipe = patch_recipe(module.TrainEagle3Recipe, module, is_ours)

    def uninstall(self) -> None:
        """Put upstream's class back wherever ours is bound (also in a recipe imported since)."""
        for module_name in (REMOTE_PACKAGE, RECIPE_MODULE):
            module = sys.modules.get(module_name)
            if module is not None and getattr(module, _CLASS_NAME, None) is self.backend:
                setattr(module, _CLASS_NAME, self.upstream)
        if self._undo_recipe is not None:
            self._undo_recipe()
            self._undo_recipe = None

    def __enter__(self) -> Installation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.uninstall()


def install(options: Mapping[str, Any] | None = None) -> Installation:
    """Make the EAGLE-3 recipe construct our client for ``target_model_backend: remote``.

    Imports the ``remote`` package (not the recipe module, whose imports are heavier) and
    rebinds ``RemoteEagle3TargetModel`` there and in the recipe module if already imported. Raises
    ``ImportError`` when NeMo AutoModel is not installed, and ``ValueError`` when an option
    is set that this client does not support, before anything is changed.
    """
    options = dict(options or {})
    resolved = ClientOptions.resolve(**options)  # a bad option (or environment value) fails here
    backend = configured_backend(options)
    package = importlib.import_module(REMOTE_PACKAGE)
    current = getattr(package, _CLASS_NAME)
    upstream = getattr(current, "_eagle3_replaces", current)  # re-installing still restores upstream's
    backend._eagle3_replaces = upstream
    for module_name in (REMOTE_PACKAGE, RECIPE_MODULE):
        module = sys.modules.get(module_name)
        if module is not None:
            setattr(module, _CLASS_NAME, backend)
    logger.info(
        "eagle3-appliance: the EAGLE-3 recipe's remote backend is now %s.%s (%s)",
        RemoteEagle3TargetModel.__module__,
        RemoteEagle3TargetModel.__name__,
        resolved.describe(),
    )
    installation = Installation(backend=backend, options=options, upstream=upstream)
    installation.patch_recipe()  # a recipe imported later is patched by the launcher (or a second call)
    return installation


_RemoteWrapper = RemoteDFlashTargetModel | RemoteDSparkTargetModel | RemoteVispecTargetModel | RemoteEagleTargetModel


class ConfigOnlyTarget:
    """What a recipe keeps as ``target_model`` when the target is remote: its config, no weights.

    The recipe reads the config (layer count, attention implementation) and, when it builds its
    trainer, the embeddings and LM head, which come from the remote wrapper (fetched once). It
    has no parameters (upstream's check that a target's weights were loaded finds none on meta).
    """

    _owns_packed_attention = False

    def __init__(self, config: Any) -> None:
        self.config = config
        self.remote: _RemoteWrapper | None = None

    def eval(self) -> ConfigOnlyTarget:
        return self

    def requires_grad_(self, requires_grad: bool = True) -> ConfigOnlyTarget:
        return self

    def to(self, *args: Any, **kwargs: Any) -> ConfigOnlyTarget:
        return self

    def named_parameters(self, *args: Any, **kwargs: Any) -> Iterator[tuple[str, Any]]:
        return iter(())

    def _wrapper(self) -> _RemoteWrapper:
        if self.remote is None:
            raise RuntimeError("the remote target is not built yet (the recipe builds it in setup())")
        return self.remote

    def get_input_embeddings(self) -> Any:
        return self._wrapper().get_input_embeddings()

    def get_output_embeddings(self) -> Any:
        wrapper = self._wrapper()
        if isinstance(wrapper, RemoteVispecTargetModel | RemoteEagleTargetModel):
            return wrapper.get_lm_head()
        return wrapper.get_output_embeddings()


_DFLASH_BASE = DFLASH_RECIPES["TrainDFlashRecipe"]


class _ConfigLoader:
    """Stands in for ``NeMoAutoModelForCausalLM`` in a remote DFlash recipe: the config, no weights."""

    @staticmethod
    def from_pretrained(path: str, **kwargs: Any) -> ConfigOnlyTarget:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(path, trust_remote_code=bool(kwargs.get("trust_remote_code", False)))
        return ConfigOnlyTarget(config.get_text_config())


class _StreamLoop:
    """The loop hooks of a recipe whose ``target_wrapper`` may read the stream (a
    :class:`~eagle3_client.automodel_stream_dflash.StreamDFlashTarget`): the runs are opened from
    the loop's first epoch and the last batch is acked once it is trained; validation batches are
    not on the stream, the appliances compute them. Any other wrapper: the recipe's loop, unchanged."""

    def run_train_validation_loop(self) -> Any:
        wrapper = getattr(self, "target_wrapper", None)
        if not isinstance(wrapper, StreamDFlashTarget):
            return super().run_train_validation_loop()  # type: ignore[misc]
        wrapper.start(int(getattr(self, "_resume_epoch", 0) or 0))
        try:
            result = super().run_train_validation_loop()  # type: ignore[misc]
        except BaseException:
            wrapper.finish(ack=False)  # the batch in hand goes to another trainer after its lease
            raise
        wrapper.finish(ack=True)  # the last batch is trained: ack it (the run closes)
        return result

    def _run_eval(self) -> Any:
        wrapper = getattr(self, "target_wrapper", None)
        if not isinstance(wrapper, StreamDFlashTarget):
            return super()._run_eval()  # type: ignore[misc]
        with wrapper.live():
            return super()._run_eval()  # type: ignore[misc]


def _sampled_loader(recipe: Any, build: Callable[..., Any]) -> Callable[..., Any]:
    """``build_eagle3_dataloader`` whose train loader samples as the producer does (stream_train_loader),
    reading the recipe's ranks when it is called (its meshes are set up by then)."""

    def build_loader(*args: Any, **kwargs: Any) -> Any:
        world = int(getattr(recipe.dist_env, "world_size", 1) or 1)
        dp_mesh = getattr(recipe, "dp_mesh", None)
        swapped = stream_train_loader(build, recipe.cfg.recipe_args, dp_mesh, world, recipe._get_dp_rank())
        return swapped(*args, **kwargs)

    return build_loader


def remote_dflash_recipe(recipe_cls: type, options: Mapping[str, Any] | None = None) -> type:
    """A subclass of a DFlash-family recipe whose target runs on appliances when the YAML says
    ``recipe_args.target_model_backend: remote`` (anything else: the recipe, unchanged).

    The recipe's own ``_build_target_wrapper`` still runs, over the config alone: it checks the
    layer ids and says whether the family captures the logits (JetSpec), and the remote wrapper
    takes exactly those. ``options`` are client keywords; the YAML's ``remote_<option>`` keys win.

    ``target_model_backend: stream`` sets up the same way and trains from a supervision stream
    (:mod:`eagle3_client.automodel_stream_dflash`): the wrapper is a
    :class:`~eagle3_client.automodel_stream_dflash.StreamDFlashTarget` over the remote one, and
    the train loader samples as the producer does.
    """
    extra = dict(options or {})

    class RemoteTargetRecipe(_StreamLoop, recipe_cls):
        def _backend(self) -> str:
            return str(self.cfg.recipe_args.get("target_model_backend", "colocated"))

        def _remote(self) -> bool:
            return self._backend() in ("remote", STREAM_BACKEND)

        def setup(self) -> Any:
            if self._backend() != STREAM_BACKEND:
                return super().setup()
            StreamSettings.from_config(self.cfg.recipe_args)  # the stream_* keys, before anything loads
            # The train loader with the producer's sampler (stream_train_loader), for setup() alone.
            module = sys.modules[_DFLASH_BASE]
            build = getattr(module, "build_eagle3_dataloader")  # noqa: B009 - swapped for setup()
            setattr(module, "build_eagle3_dataloader", _sampled_loader(self, build))  # noqa: B010
            try:
                return super().setup()
            finally:
                setattr(module, "build_eagle3_dataloader", build)  # noqa: B010

        def _build_target_model(self, recipe_cfg: Any, target_path: str, draft_spec: Any) -> Any:
            if not self._remote():
                return super()._build_target_model(recipe_cfg, target_path, draft_spec)
            # The recipe's own method, so that its meshes and checks are set up as always, with
            # a loader that reads the config instead of the weights.
            module = sys.modules[_DFLASH_BASE]
            loader = getattr(module, "NeMoAutoModelForCausalLM")  # noqa: B009 - swapped for one call
            setattr(module, "NeMoAutoModelForCausalLM", _ConfigLoader)  # noqa: B010
            try:
                return super()._build_target_model(recipe_cfg, target_path, draft_spec)
            finally:
                setattr(module, "NeMoAutoModelForCausalLM", loader)  # noqa: B010

        def _build_target_wrapper(self, target_layer_ids: list[int]) -> Any:
            if not self._remote():
                return super()._build_target_wrapper(target_layer_ids)
            cp_mesh = getattr(self, "cp_mesh", None)
            if cp_mesh is not None and cp_mesh.size() > 1:
                raise ValueError("context parallelism (cp_size>1) shards a co-located target; a remote one needs none")
            local = super()._build_target_wrapper(target_layer_ids)
            recipe_cfg = self.cfg.recipe_args
            urls = recipe_cfg.get("remote_urls", None)
            if not urls:
                raise ValueError(f"target_model_backend={self._backend()} needs recipe_args.remote_urls")
            kwargs = {**extra, **options_from_config(recipe_cfg)}
            wrapper = RemoteDFlashTargetModel.from_urls(
                _url_list(urls),
                target_layer_ids=local.target_layer_ids,
                capture_logits=local.capture_logits,
                device=self.device,
                **kwargs,
            )
            self.target_model.remote = wrapper
            logger.info(
                "eagle3-appliance: %s captures layers %s%s from %s",
                recipe_cls.__name__,
                wrapper.target_layer_ids,
                " and the logits" if wrapper.capture_logits else "",
                wrapper.urls,
            )
            if self._backend() != STREAM_BACKEND:
                return wrapper
            return StreamDFlashTarget(
                wrapper,
                StreamSettings.from_config(recipe_cfg),
                rank=self._get_dp_rank(),
                epochs=int(recipe_cfg.get("num_epochs", 1)),
                device=self.device,
                options=kwargs,
            )

    RemoteTargetRecipe.__name__ = RemoteTargetRecipe.__qualname__ = recipe_cls.__name__
    return RemoteTargetRecipe


@dataclass(frozen=True)
class _StreamSwap:
    """How a swapping recipe trains from the stream: which of its module's names builds the target
    wrapper (``wrapper_name``), the stream wrapper over the remote one (``wrap(recipe, remote,
    client_kwargs)``), why a config cannot (``refusal(recipe_args)``, None: it can), and which name
    builds the train loader, swapped to sample as the producer does (``loader_name``)."""

    wrapper_name: str
    wrap: Callable[[Any, Any, dict[str, Any]], Any]
    refusal: Callable[[Any], str | None]
    loader_name: str = "build_eagle3_dataloader"  # the module's train-loader builder


def _remote_loader(connect: Callable[[], _RemoteWrapper]) -> type:
    """A stand-in for a recipe's target loader, for its one call: the config, and the servers (``connect()``).

    Connecting here, not when the wrapper is built, lets the checks a recipe runs on its loaded
    target (upstream's ``raise_if_target_not_materialized``) read the embeddings the servers hold.
    """

    class RemoteLoader:
        @staticmethod
        def from_pretrained(path: str, **load_kwargs: Any) -> ConfigOnlyTarget:
            from transformers import AutoConfig

            trust = bool(load_kwargs.get("trust_remote_code", False))
            target = ConfigOnlyTarget(AutoConfig.from_pretrained(path, trust_remote_code=trust))
            target.remote = connect()
            return target

    return RemoteLoader


def _served_wrapper(model: Any, wrapper_type: type[_RemoteWrapper]) -> Any:
    """The remote wrapper the recipe's loader (:func:`_remote_loader`) connected, for the recipe's wrapper call."""
    wrapper = model._wrapper() if isinstance(model, ConfigOnlyTarget) else None
    if not isinstance(wrapper, wrapper_type):
        raise TypeError(f"the remote {wrapper_type.__name__} needs the recipe's remote target model, not {type(model)}")
    return wrapper


def _swapping_recipe(
    recipe_cls: type,
    module_name: str,
    label: str,
    swaps: Callable[[Any, list[str] | str, dict[str, Any]], dict[str, Any]],
    options: Mapping[str, Any] | None,
    stream: _StreamSwap | None = None,
) -> type:
    """A subclass of ``recipe_cls`` whose ``setup()`` runs with names of its module swapped
    (``swaps(recipe, urls, client_kwargs)``) when the YAML says ``target_model_backend: remote``.

    What DSpark's, ViSpec's and EAGLE-1/2's recipes share: they build their target and its wrapper inline in
    ``setup()`` from names their module imported, so swapping those names for that one call makes
    upstream's own ``setup()`` build ours. ``stream``: the same, plus the train loader sampling as
    the producer does and the wrapper reading the stream (``stream``; None: refused, ``label``
    naming the family); any other backend is the recipe, unchanged.
    """
    extra = dict(options or {})

    class RemoteTargetRecipe(_StreamLoop, recipe_cls):
        def setup(self) -> Any:
            recipe_cfg = self.cfg.recipe_args
            backend = recipe_cfg.get("target_model_backend", "colocated")
            if backend == STREAM_BACKEND:
                refusal = "it has none" if stream is None else stream.refusal(recipe_cfg)
                if refusal is not None:
                    raise ValueError(
                        f"{recipe_cls.__name__} ({label}) cannot train with target_model_backend: stream: "
                        f"{refusal}; train it with target_model_backend: remote"
                    )
                StreamSettings.from_config(recipe_cfg)  # the stream_* keys, before anything loads
            elif backend != "remote":
                return super().setup()
            urls = recipe_cfg.get("remote_urls", None)
            if not urls:
                raise ValueError(f"target_model_backend={backend} needs recipe_args.remote_urls")
            kwargs = {**extra, **options_from_config(recipe_cfg)}
            module = sys.modules[module_name]
            replacements = swaps(self, _url_list(urls), kwargs)
            if backend == STREAM_BACKEND:
                assert stream is not None
                replacements = {**replacements, **self._stream_swaps(module, replacements, kwargs)}
            saved = {name: getattr(module, name) for name in replacements}
            for name, value in replacements.items():
                setattr(module, name, value)  # for setup() only
            try:
                return super().setup()
            finally:
                for name, value in saved.items():
                    setattr(module, name, value)

        def _stream_swaps(self, module: Any, replacements: dict[str, Any], kwargs: dict[str, Any]) -> dict[str, Any]:
            """The train loader sampling as the producer does, and the wrapper reading the stream."""
            assert stream is not None
            remote_wrapper = replacements[stream.wrapper_name]
            recipe = self

            def stream_wrapper(*args: Any, **wrapper_kwargs: Any) -> Any:
                return stream.wrap(recipe, remote_wrapper(*args, **wrapper_kwargs), kwargs)

            build = getattr(module, stream.loader_name)
            return {stream.wrapper_name: stream_wrapper, stream.loader_name: _sampled_loader(self, build)}

    RemoteTargetRecipe.__name__ = RemoteTargetRecipe.__qualname__ = recipe_cls.__name__
    return RemoteTargetRecipe


def _refuse_context_parallelism(cp_mesh: Any) -> None:
    if cp_mesh is not None and cp_mesh.size() > 1:
        raise ValueError("context parallelism (cp_size>1) shards a co-located target; a remote one needs none")


def remote_dspark_recipe(recipe_cls: type, options: Mapping[str, Any] | None = None) -> type:
    """A subclass of the DSpark recipe whose target runs on appliances when the YAML says
    ``recipe_args.target_model_backend: remote`` (anything else: the recipe, unchanged).

    The recipe's own ``setup()`` runs, with two names of its module swapped for that call: the
    target loader reads the config only (:class:`ConfigOnlyTarget`), and ``HFDSparkTargetModel``
    builds :class:`~eagle3_client.dspark.RemoteDSparkTargetModel` with the layer ids the recipe
    resolved and checked. ``options`` are client keywords; the YAML's ``remote_<option>`` keys win.
    """

    def swaps(recipe: Any, urls: list[str] | str, kwargs: dict[str, Any]) -> dict[str, Any]:
        def remote_wrapper(model: Any, target_layer_ids: Sequence[int], cp_mesh: Any = None) -> Any:
            _refuse_context_parallelism(cp_mesh)
            wrapper = RemoteDSparkTargetModel.from_urls(
                urls, target_layer_ids=list(target_layer_ids), device=recipe.device, **kwargs
            )
            if isinstance(model, ConfigOnlyTarget):
                model.remote = wrapper
            logger.info(
                "eagle3-appliance: %s captures layers %s from %s",
                recipe_cls.__name__,
                wrapper.target_layer_ids,
                wrapper.urls,
            )
            return wrapper

        return {"NeMoAutoModelForCausalLM": _ConfigLoader, "HFDSparkTargetModel": remote_wrapper}

    def stream_refusal(recipe_cfg: Any) -> str | None:
        if bool(recipe_cfg.get("multimodal", False)):
            return "multimodal: true batches carry vision inputs, which the stream's recipe mode does not produce"
        if recipe_cfg.get("cached_target_path", None):
            return "cached_target_path trains from a cache, without a target"
        return None

    stream = _StreamSwap("HFDSparkTargetModel", _stream_target(StreamDSparkTarget), stream_refusal)
    return _swapping_recipe(recipe_cls, DSPARK_RECIPES["TrainDSparkRecipe"], "DSpark", swaps, options, stream)


def _stream_target(cls: type[StreamDFlashTarget]) -> Callable[[Any, Any, dict[str, Any]], Any]:
    """A :attr:`_StreamSwap.wrap`: ``cls`` over the recipe's remote wrapper, with its stream_* keys."""

    def wrap(recipe: Any, remote: Any, kwargs: dict[str, Any]) -> Any:
        recipe_cfg = recipe.cfg.recipe_args
        settings = StreamSettings.from_config(recipe_cfg)
        epochs = int(recipe_cfg.get("num_epochs", 1))
        return cls(remote, settings, rank=recipe._get_dp_rank(), epochs=epochs, device=recipe.device, options=kwargs)

    return wrap


def remote_vispec_recipe(recipe_cls: type, options: Mapping[str, Any] | None = None) -> type:
    """A subclass of ViSpec's stage-2 recipe whose vision-language target runs on appliances when the
    YAML says ``recipe_args.target_model_backend: remote`` (anything else: the recipe, unchanged).

    The recipe's own ``setup()`` runs, with two names of its module swapped for that call:
    ``AutoModelForImageTextToText`` reads the config only and connects to the servers
    (:class:`ConfigOnlyTarget` over a :class:`~eagle3_client.vispec.RemoteVispecTargetModel`), so
    upstream's check that the target's weights were loaded runs on the embeddings the servers
    hold; and ``HFVispecTargetModel`` hands the recipe that remote wrapper, after checking that the
    image token id the recipe resolved (config, then processor) is the one the servers name. The
    tokenizer, the processor and the data pipeline stay the recipe's (they are read from
    ``target_model_name_or_path``, which must hold the config, tokenizer and processor files, not
    the weights). ``options`` are client keywords; the YAML's ``remote_<option>`` keys win.
    """

    def swaps(recipe: Any, urls: list[str] | str, kwargs: dict[str, Any]) -> dict[str, Any]:
        loader = _remote_loader(lambda: RemoteVispecTargetModel.from_urls(urls, device=recipe.device, **kwargs))

        def remote_wrapper(model: Any, *, image_token_id: int) -> Any:
            wrapper = _served_wrapper(model, RemoteVispecTargetModel)
            if wrapper.image_token_id != int(image_token_id):
                raise ValueError(
                    f"the recipe's image token id is {image_token_id} but the servers at {wrapper.urls} name "
                    f"{wrapper.image_token_id}: they serve another checkpoint than target_model_name_or_path"
                )
            logger.info(
                "eagle3-appliance: %s captures the embeddings, last hidden state and logits (image token %d) from %s",
                recipe_cls.__name__,
                wrapper.image_token_id,
                wrapper.urls,
            )
            return wrapper

        return {"AutoModelForImageTextToText": loader, "HFVispecTargetModel": remote_wrapper}

    stream = _StreamSwap(
        "HFVispecTargetModel", _stream_target(StreamVispecTarget), lambda _cfg: None, "build_dspark_vlm_dataloader"
    )
    return _swapping_recipe(recipe_cls, VISPEC_RECIPES["TrainVispecRecipe"], "ViSpec", swaps, options, stream)


def remote_eagle_recipe(recipe_cls: type, options: Mapping[str, Any] | None = None) -> type:
    """A subclass of an EAGLE-1/EAGLE-2 recipe (or ViSpec's text-only stage 1) whose target runs on
    appliances when the YAML says ``recipe_args.target_model_backend: remote`` (anything else: the
    recipe, unchanged).

    The recipe's own ``setup()`` runs, with two names of the module that defines it swapped for that
    call: the target loader (``NeMoAutoModelForCausalLM``; ``AutoModelForImageTextToText`` for ViSpec's
    stage 1) reads the config only and connects to the servers (:class:`ConfigOnlyTarget` over a
    :class:`~eagle3_client.eagle.RemoteEagleTargetModel`), so the checks the recipe runs on its target
    read the served embeddings; and ``HFEagleTargetModel`` hands the recipe that remote wrapper, whose
    embeddings and LM head the draft copies. ``options`` are client keywords; the YAML's
    ``remote_<option>`` keys win.
    """
    module_name = next(c.__module__ for c in recipe_cls.__mro__ if "setup" in vars(c))
    loader_name = _EAGLE_TARGET_LOADERS.get(module_name)
    if loader_name is None:
        raise TypeError(f"{recipe_cls.__name__}'s setup() comes from {module_name}, whose target loader is not known")

    def swaps(recipe: Any, urls: list[str] | str, kwargs: dict[str, Any]) -> dict[str, Any]:
        loader = _remote_loader(lambda: RemoteEagleTargetModel.from_urls(urls, device=recipe.device, **kwargs))

        def remote_wrapper(model: Any) -> Any:
            wrapper = _served_wrapper(model, RemoteEagleTargetModel)
            logger.info(
                "eagle3-appliance: %s captures the last hidden state and its logits from %s",
                recipe_cls.__name__,
                wrapper.urls,
            )
            return wrapper

        return {loader_name: loader, "HFEagleTargetModel": remote_wrapper}

    return _swapping_recipe(recipe_cls, module_name, "EAGLE-1/2", swaps, options)
