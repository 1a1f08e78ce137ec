"""Progress while transformers loads a checkpoint: tensors loaded of the total, at a steady pace.

transformers draws its own "Loading weights" bar only when its progress bars are on, and the
server switches them off (they would fill a log with carriage returns). This installs a hook
through transformers' ``set_tqdm_hook`` for the duration of one load, so that its loading loop
reports through :class:`~eagle3_appliance.progress.Progress` instead: a bar on a
terminal, a log line every ``interval_s`` seconds otherwise, each prefixed with the tensor-
parallel rank when there is one. Other bars transformers may open are left as they were.
A transformers without the hook (older than 5.x) loads as before, with the start and end
lines only.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from eagle3_appliance.progress import DEFAULT_INTERVAL_S, Progress

__all__ = ["LOADING_DESC", "checkpoint_files", "loading_progress"]

logger = logging.getLogger(__name__)

# The description of transformers' weight-loading loop (core_model_loading.py).
LOADING_DESC = "Loading weights"


def checkpoint_files(source: str | Path) -> tuple[int, int] | None:
    """(files, bytes) of a local folder's weight files, or None when ``source`` is not a local folder."""
    folder = Path(source)
    if not folder.is_dir():
        return None
    files = [p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


class _Tracked:
    """What transformers' loop gets instead of a tqdm: iterates, counts, and accepts tqdm's calls."""

    def __init__(self, iterable: Iterable[Any], progress: Progress) -> None:
        self.iterable, self.progress = iterable, progress

    def __iter__(self) -> Iterator[Any]:
        try:
            for item in self.iterable:
                yield item
                self.progress.update()
        finally:
            self.progress.close()

    def __len__(self) -> int:
        return self.progress.total or 0

    def update(self, n: int = 1) -> None:
        self.progress.update(n)

    def close(self) -> None:
        self.progress.close()

    def __enter__(self) -> _Tracked:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getattr__(self, name: str) -> Callable[..., None]:  # set_postfix, refresh, ...: nothing to do
        return lambda *args, **kwargs: None


@contextlib.contextmanager
def loading_progress(
    source: str | Path, rank: int | None = None, interval_s: float = DEFAULT_INTERVAL_S
) -> Iterator[None]:
    """Report the progress of the ``from_pretrained`` calls made inside this block."""
    from transformers.utils import logging as hf_logging

    prefix = f"rank {rank}: " if rank is not None else ""
    size = checkpoint_files(source)
    if size is not None:
        logger.info("%sloading weights from %s: %d files, %.1f MiB", prefix, source, size[0], size[1] / 2**20)
    set_hook = getattr(hf_logging, "set_tqdm_hook", None)
    if set_hook is None:
        yield
        return

    def hook(factory: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if kwargs.get("desc") != LOADING_DESC:
            return factory(*args, **kwargs)
        iterable = args[0] if args else kwargs.get("iterable", ())
        total = kwargs.get("total")
        if total is None:
            with contextlib.suppress(TypeError):
                total = len(iterable)
        progress = Progress(f"{prefix}loading weights", total, unit="tensors", logger=logger, interval_s=interval_s)
        return _Tracked(iterable, progress)

    previous = set_hook(hook)
    try:
        yield
    finally:
        set_hook(previous)
