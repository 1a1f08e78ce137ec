"""``target_model_backend: stream``: NeMo AutoModel's EAGLE-3 recipe trains from a supervision stream.

The recipe's YAML switch, beside ``remote``::

    recipe_args:
      target_model_backend: stream
      remote_urls: ["http://node3:8001"]        # any appliance: embeddings, model info (fetched once)
      stream_queue: appliance://node3:8001     # or redis://host:6379/0
      stream_run_id: run-7                     # what `eagle3-appliance produce -c recipe.yaml` was given
      stream_read_ahead: 2                     # samples claimed in the background (default 2)

The trainer loads no target weights: it sets up exactly as with ``remote`` (our client, the
embeddings fetched once, the draft vocabulary built from the recipe's own dataloader), then
each epoch takes its batches from the stream through upstream's ``FeatureDataLoader`` instead
of asking a server per step. Runs are one per epoch and data-parallel rank
(:func:`stream_run_id`), so every rank trains exactly its share of every epoch, as its
``DistributedSampler`` would have given it, and a trainer restarted from a checkpoint resumes
its epoch's run where its acked position stands (acked samples are never delivered again).
The run must have been produced for this recipe (``eagle3-appliance produce -c recipe.yaml``):
a draft vocabulary other than the run's is refused before the first step.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from eagle3_client import protocol
from eagle3_client.streaming.queues import RunMismatch

__all__ = ["STREAM_BACKEND", "StreamSettings", "patch_recipe_for_stream", "stream_run_id"]

logger = logging.getLogger(__name__)

STREAM_BACKEND = "stream"
_MARK = "_eagle3_stream_original"


def stream_run_id(run_id: str, epoch: int, rank: int) -> str:
    """The run of one epoch of one data-parallel rank (what the producer's recipe mode creates)."""
    return protocol.check_stream_id(f"{run_id}.e{epoch}.r{rank}", "the run id")


@dataclass(frozen=True)
class StreamSettings:
    """The ``stream_*`` keys of ``recipe_args``."""

    queue: str
    run_id: str
    read_ahead: int = 2

    @classmethod
    def from_config(cls, recipe_cfg: Any) -> StreamSettings:
        queue, run_id = recipe_cfg.get("stream_queue", None), recipe_cfg.get("stream_run_id", None)
        if not queue or not run_id:
            raise ValueError(
                "target_model_backend: stream needs recipe_args.stream_queue (appliance://host:port or "
                "redis://host:port/db) and recipe_args.stream_run_id (the producer's --run-id)"
            )
        read_ahead = int(recipe_cfg.get("stream_read_ahead", 2))
        if read_ahead < 0:
            raise ValueError(f"recipe_args.stream_read_ahead must be >= 0, got {read_ahead}")
        protocol.check_stream_id(str(run_id), "recipe_args.stream_run_id")
        return cls(str(queue), str(run_id), read_ahead)


class _AsRemote:
    """``recipe_args`` as the recipe's setup reads it: the stream's trainer sets up as a remote one."""

    def __init__(self, cfg: Any) -> None:
        self._cfg = cfg

    def get(self, key: str, default: Any = None) -> Any:
        if key == "target_model_backend":
            return "remote"
        return self._cfg.get(key, default)

    def __getattr__(self, name: str) -> Any:
        if name == "target_model_backend":
            return "remote"
        return getattr(self._cfg, name)

    def __contains__(self, key: str) -> bool:
        return key in self._cfg


def _is_stream(recipe_cfg: Any) -> bool:
    return bool(recipe_cfg.get("target_model_backend", "colocated") == STREAM_BACKEND)


def patch_recipe_for_stream(recipe_cls: Any, client_options: Callable[[], dict[str, Any]]) -> Callable[[], None]:
    """Teach ``TrainEagle3Recipe`` the ``stream`` backend (module docstring); returns the undo.

    ``client_options()``: the client options for the claims (``remote_<option>`` keys, the
    environment). Patching twice patches once.
    """
    if hasattr(recipe_cls._setup_online_target, _MARK):
        return lambda: None
    setup = recipe_cls._setup_online_target
    depth = recipe_cls._resolve_prefetch_depth
    prefetch = recipe_cls._prefetched_batches
    epochs = recipe_cls._train_epochs

    def _setup_online_target(self: Any, recipe_cfg: Any, *args: Any, **kwargs: Any) -> Any:
        if not _is_stream(recipe_cfg):
            return setup(self, recipe_cfg, *args, **kwargs)
        settings = StreamSettings.from_config(recipe_cfg)
        for refused in ("parallel_drafting", "regen"):
            if recipe_cfg.get(refused, None):
                raise ValueError(f"target_model_backend: stream does not support recipe_args.{refused}")
        ids, mask = setup(self, _AsRemote(recipe_cfg), *args, **kwargs)
        self._eagle3_stream = (settings, protocol.mapping_digest(ids))
        return ids, mask

    def _resolve_prefetch_depth(self: Any, recipe_cfg: Any) -> int:
        if _is_stream(recipe_cfg):
            return 1  # the loop's prefetch path: (batch, supervision) pairs, here from the stream
        return int(depth(self, recipe_cfg))

    def _train_epochs(self: Any, start_epoch: int, *args: Any, **kwargs: Any) -> Any:
        self._eagle3_stream_epoch = start_epoch  # the loop asks for one pass per epoch, in order
        return epochs(self, start_epoch, *args, **kwargs)

    def _prefetched_batches(self: Any, dataloader: Any) -> Iterator[tuple[Any, Any]]:
        stream = getattr(self, "_eagle3_stream", None)
        if stream is None:
            yield from prefetch(self, dataloader)
            return
        epoch = getattr(self, "_eagle3_stream_epoch", 0)
        self._eagle3_stream_epoch = epoch + 1
        yield from _epoch_from_stream(self, stream[0], stream[1], epoch, client_options())

    patched = {
        "_setup_online_target": _setup_online_target,
        "_resolve_prefetch_depth": _resolve_prefetch_depth,
        "_train_epochs": _train_epochs,
        "_prefetched_batches": _prefetched_batches,
    }
    originals = {name: getattr(recipe_cls, name) for name in patched}
    for name, fn in patched.items():
        setattr(fn, _MARK, originals[name])
        setattr(recipe_cls, name, fn)

    def undo() -> None:
        for name, fn in originals.items():
            setattr(recipe_cls, name, fn)

    return undo


def _epoch_from_stream(
    recipe: Any, settings: StreamSettings, digest: str, epoch: int, options: dict[str, Any]
) -> Iterator[tuple[Any, Any]]:
    """One epoch of this rank: upstream's ``FeatureDataLoader`` over the epoch's run, until it closes."""
    from nemo_automodel.components.speculative.streaming import FeatureDataLoader

    from eagle3_client.streaming.open import open_stream

    rank = int(getattr(recipe.dist_env, "rank", 0) or 0)
    run_id = stream_run_id(settings.run_id, epoch, rank)
    queue, store = open_stream(
        settings.queue,
        run_id=run_id,
        device=recipe.device,
        read_ahead=settings.read_ahead,
        in_order=True,  # the producer put the recipe's order: train in it
        **options,
    )
    try:
        theirs = store.description.mapping_digest
        if theirs is not None and theirs != digest:
            raise RunMismatch(
                f"run {run_id!r} was produced with another draft vocabulary (digest {theirs}) than this "
                f"recipe's ({digest}); produce it with `eagle3-appliance produce -c` and this recipe's YAML"
            )
        logger.info("epoch %d of rank %d from the stream: run %s on %s", epoch, rank, run_id, settings.queue)
        loader = FeatureDataLoader(queue, store)
        try:
            for target_batch in loader:
                yield None, target_batch
        finally:
            loader.close()
    finally:
        store.close()
