"""Make NeMo AutoModel's EAGLE-3 recipe use this client for ``target_model_backend: remote``.

The recipe (``nemo_automodel.recipes.llm.train_eagle3``) builds its remote backend by name:
it imports ``RemoteEagle3TargetModel`` from ``nemo_automodel.components.speculative.eagle.remote``
when the module is first imported, and later calls ``RemoteEagle3TargetModel.from_urls(urls,
device=..., timeout=recipe_args.remote_timeout, max_retries=recipe_args.remote_max_retries)``.
:func:`install` rebinds that one name, in the ``remote`` package (so a recipe imported later
picks it up) and in the recipe module if it is already imported, to a subclass of our
:class:`~eagle3_client.backend.RemoteEagle3TargetModel` that adds the options below. Nothing else
in AutoModel changes, and :meth:`Installation.uninstall` puts upstream's class back.

Our options, each read from the recipe YAML's ``recipe_args`` or else from the environment
(the YAML, including ``--recipe_args.KEY=VALUE`` overrides, wins; unset means the client's
default)::

    recipe_args key        environment            client keyword
    remote_data_plane      EAGLE3_DATA_PLANE      data_plane
    remote_encoding        EAGLE3_ENCODING        encoding
    remote_auth_token      EAGLE3_AUTH_TOKEN      auth_token or token (else an Authorization header)
    remote_lease_seconds   EAGLE3_LEASE_SECONDS   lease_seconds

Usage (what :mod:`eagle3_client.automodel_launch` does)::

    from eagle3_client.automodel import install, options_from_config
    install(options_from_config(cfg.recipe_args))
    from nemo_automodel.recipes.llm.train_eagle3 import TrainEagle3Recipe
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from eagle3_client.backend import RemoteEagle3TargetModel

__all__ = [
    "OPTION_SOURCES",
    "REMOTE_PACKAGE",
    "RECIPE_MODULE",
    "ClientOptions",
    "Installation",
    "client_kwargs",
    "configured_backend",
    "install",
    "options_from_config",
]

logger = logging.getLogger(__name__)

# Where the recipe resolves the backend class from, and the recipe module itself.
REMOTE_PACKAGE = "nemo_automodel.components.speculative.eagle.remote"
RECIPE_MODULE = "nemo_automodel.recipes.llm.train_eagle3"
_CLASS_NAME = "RemoteEagle3TargetModel"

# option -> (recipe_args key, environment variable). The ``remote_`` prefix follows the
# recipe's own ``remote_urls`` / ``remote_timeout`` / ``remote_max_retries`` keys.
OPTION_SOURCES: dict[str, tuple[str, str]] = {
    "data_plane": ("remote_data_plane", "EAGLE3_DATA_PLANE"),
    "encoding": ("remote_encoding", "EAGLE3_ENCODING"),
    "auth_token": ("remote_auth_token", "EAGLE3_AUTH_TOKEN"),
    "lease_seconds": ("remote_lease_seconds", "EAGLE3_LEASE_SECONDS"),
}


@dataclass(frozen=True)
class ClientOptions:
    """Our client's options beyond upstream's ``from_urls`` arguments; None = client default."""

    data_plane: str | None = None
    encoding: str | None = None
    auth_token: str | None = None
    lease_seconds: float | None = None

    def set_options(self) -> dict[str, Any]:
        """The options that were given, by name."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def describe(self) -> str:
        """For logs: every set option, the token masked."""
        shown = {k: ("***" if k == "auth_token" else v) for k, v in self.set_options().items()}
        return ", ".join(f"{k}={v}" for k, v in shown.items()) or "client defaults"


def options_from_config(recipe_args: Any = None, environ: Mapping[str, str] | None = None) -> ClientOptions:
    """Our options from ``recipe_args`` (a ConfigNode or a mapping), else from the environment.

    Empty values count as unset. A lease that is not a positive number is a ``ValueError``
    naming where it came from.
    """
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for name, (key, env) in OPTION_SOURCES.items():
        value, source = _lookup(recipe_args, key), f"recipe_args.{key}"
        if value is None or str(value).strip() == "":
            value, source = environ.get(env), env
        if value is None or str(value).strip() == "":
            continue
        values[name] = _parse_lease(value, source) if name == "lease_seconds" else str(value).strip()
    return ClientOptions(**values)


def _lookup(recipe_args: Any, key: str) -> Any:
    if recipe_args is None:
        return None
    getter = getattr(recipe_args, "get", None)  # ConfigNode and Mapping both have .get
    return getter(key, None) if getter is not None else None


def _parse_lease(value: Any, source: str) -> float:
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{source} must be a number of seconds, got {value!r}") from None
    if not seconds > 0:
        raise ValueError(f"{source} must be positive, got {value!r}")
    return seconds


def client_kwargs(options: ClientOptions) -> dict[str, Any]:
    """Keyword arguments for ``RemoteEagle3TargetModel.from_urls`` that carry ``options``.

    Only options that are set are passed, so the client's own defaults (which read the same
    ``EAGLE3_*`` variables) apply otherwise. The token is the client's ``token`` parameter.
    """
    return {("token" if name == "auth_token" else name): value for name, value in options.set_options().items()}


def configured_backend(options: ClientOptions | None = None) -> type[RemoteEagle3TargetModel]:
    """Our client class with ``options`` applied by ``from_urls`` (the recipe's constructor)."""
    extra = client_kwargs(options or ClientOptions())

    class AutoModelRemoteTarget(RemoteEagle3TargetModel):
        """``eagle3_client.RemoteEagle3TargetModel`` as built by NeMo AutoModel's EAGLE-3 recipe."""

        @classmethod
        def from_urls(cls, urls: Any, **kwargs: Any) -> RemoteEagle3TargetModel:
            # Arguments the recipe passes win over ours.
            return super().from_urls(_url_list(urls), **{**extra, **kwargs})

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
    options: ClientOptions
    upstream: type

    def uninstall(self) -> None:
        """Put upstream's class back wherever ours is bound (also in a recipe imported since)."""
        for module_name in (REMOTE_PACKAGE, RECIPE_MODULE):
            module = sys.modules.get(module_name)
            if module is not None and getattr(module, _CLASS_NAME, None) is self.backend:
                setattr(module, _CLASS_NAME, self.upstream)

    def __enter__(self) -> Installation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.uninstall()


def install(options: ClientOptions | None = None) -> Installation:
    """Make the EAGLE-3 recipe construct our client for ``target_model_backend: remote``.

    Imports the ``remote`` package (not the recipe module, whose imports are heavier) and
    rebinds ``RemoteEagle3TargetModel`` there and in the recipe module if already imported. Raises
    ``ImportError`` when NeMo AutoModel is not installed, and ``ValueError`` when an option
    is set that this client does not support, before anything is changed.
    """
    options = options or ClientOptions()
    backend = configured_backend(options)
    package = importlib.import_module(REMOTE_PACKAGE)
    current = getattr(package, _CLASS_NAME)
    upstream = getattr(current, "_eagle3_replaces", current)  # re-installing still restores upstream's
    backend._eagle3_replaces = upstream  # type: ignore[attr-defined]
    for module_name in (REMOTE_PACKAGE, RECIPE_MODULE):
        module = sys.modules.get(module_name)
        if module is not None:
            setattr(module, _CLASS_NAME, backend)
    logger.info(
        "eagle3-appliance: the EAGLE-3 recipe's remote backend is now %s.%s (%s)",
        RemoteEagle3TargetModel.__module__,
        RemoteEagle3TargetModel.__name__,
        options.describe(),
    )
    return Installation(backend=backend, options=options, upstream=upstream)
