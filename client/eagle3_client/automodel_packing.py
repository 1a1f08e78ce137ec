"""Let NeMo AutoModel's EAGLE-3 recipe train packed rows (``packed_sequence_size > 0``) with our client.

The recipe (nemo-automodel 0.7.0) refuses packing with any target but the co-located one
("packed_sequence_size > 0 is only supported with the colocated target backend"), since
upstream's remote server runs every row as one sequence. Our appliance runs packed rows as the
co-located target does (negotiated: a server that cannot pack is never asked to), so
:func:`patch_recipe` lifts that gate for our backend alone, and nothing else:

* ``_setup_online_target``: when the backend is ``remote`` and the recipe's remote class is ours,
  the gate reads ``packed_sequence_size`` as 0; the dataloaders the method builds get the real
  size (the train loader reads it from the config anyway; the validation loader, from the value
  the gate read, is given the real one). Any other backend, or upstream's remote class, goes
  through the recipe untouched and meets its gate.
* ``_prefetched_batches`` (``target_prefetch_depth > 0``): the recipe's prefetch sends only
  ``input_ids``, ``attention_mask`` and ``loss_mask``; with our client it also sends a packed
  batch's ``position_ids``, ``seq_lens`` and ``doc_remaining``, as the recipe's non-prefetch path
  does. Same depth and ordering (refill only after the oldest request completed; drain on close).

:func:`eagle3_client.automodel.install` applies it to an imported recipe (the launcher, once it
has imported the recipe, through ``Installation.patch_recipe``); ``Installation.uninstall`` reverts it.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from eagle3_client.protocol import PACKING_KEYS

__all__ = ["patch_recipe"]

_MARK = "_eagle3_packing_original"


def patch_recipe(recipe_cls: Any, recipe_module: Any, is_ours: Callable[[], bool]) -> Callable[[], None]:
    """Patch ``recipe_cls`` (``TrainEagle3Recipe``) as the module docstring says; returns the undo.

    ``is_ours()``: whether the recipe module's ``RemoteEagle3TargetModel`` is our client now.
    Patching twice patches once.
    """
    if hasattr(recipe_cls._setup_online_target, _MARK):
        return lambda: None
    setup = recipe_cls._setup_online_target
    prefetch = recipe_cls._prefetched_batches

    def _setup_online_target(self: Any, recipe_cfg: Any, *args: Any, **kwargs: Any) -> Any:
        size = int(recipe_cfg.get("packed_sequence_size", 0) or 0)
        remote = recipe_cfg.get("target_model_backend", "colocated") == "remote"
        if size <= 0 or not remote or not is_ours():
            return setup(self, recipe_cfg, *args, **kwargs)
        with _loaders_packed(recipe_module, size):
            return setup(self, _GateView(recipe_cfg), *args, **kwargs)

    def _prefetched_batches(self: Any, dataloader: Any) -> Iterator[tuple[Any, Any]]:
        if not is_ours():
            yield from prefetch(self, dataloader)
            return
        yield from _prefetch_packed(self.target_wrapper, dataloader, self.target_prefetch_depth)

    setattr(_setup_online_target, _MARK, setup)
    recipe_cls._setup_online_target = _setup_online_target
    recipe_cls._prefetched_batches = _prefetched_batches

    def undo() -> None:
        recipe_cls._setup_online_target = setup
        recipe_cls._prefetched_batches = prefetch

    return undo


class _GateView:
    """The recipe's ``recipe_args`` with ``packed_sequence_size`` read as 0 (what its gate reads)."""

    def __init__(self, cfg: Any) -> None:
        self._cfg = cfg

    def get(self, key: str, default: Any = None) -> Any:
        return 0 if key == "packed_sequence_size" else self._cfg.get(key, default)

    def __getattr__(self, name: str) -> Any:
        if name == "packed_sequence_size":
            return 0
        return getattr(self._cfg, name)

    def __contains__(self, key: object) -> bool:
        return key in self._cfg


@contextlib.contextmanager
def _loaders_packed(recipe_module: Any, size: int) -> Iterator[None]:
    """Every dataloader the recipe builds meanwhile packs rows of ``size`` (the real setting)."""
    build = recipe_module.build_eagle3_dataloader

    def build_packed(*args: Any, **kwargs: Any) -> Any:
        return build(*args, **{**kwargs, "packed_sequence_size": size})

    recipe_module.build_eagle3_dataloader = build_packed
    try:
        yield
    finally:
        recipe_module.build_eagle3_dataloader = build


def _prefetch_packed(target: Any, dataloader: Any, depth: int) -> Iterator[tuple[Any, Any]]:
    """``(batch, target_batch)`` with up to ``depth`` requests in flight, packing included."""
    batches = iter(dataloader)
    queue: collections.deque[tuple[Any, Any]] = collections.deque()
    exhausted = False

    def fill() -> None:
        nonlocal exhausted
        while not exhausted and len(queue) < depth:
            try:
                batch = next(batches)
            except StopIteration:
                exhausted = True
                return
            packing = {key: batch[key] for key in PACKING_KEYS} if "seq_lens" in batch else {}
            handle = target.generate_batch_async(
                batch["input_ids"], batch["attention_mask"], batch["loss_mask"], **packing
            )
            queue.append((batch, handle))

    fill()
    try:
        while queue:
            batch, handle = queue.popleft()
            target_batch = handle.result()
            fill()  # after the result, as the recipe does: its server is then free for the next one
            yield batch, target_batch
    finally:
        while queue:  # the consumer stopped early: finish what is in flight, discard it
            queue.popleft()[1].result()
