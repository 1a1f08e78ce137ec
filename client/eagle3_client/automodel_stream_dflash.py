"""``target_model_backend: stream`` for the DFlash family (DFlash, DFlash 2, JetSpec, Domino) and DSpark.

The YAML keys are those of the EAGLE-3 recipe's stream backend
(:mod:`eagle3_client.automodel_stream`)::

    recipe: TrainDFlashRecipe
    recipe_args:
      target_model_backend: stream
      remote_urls: ["http://node3:8001"]        # any appliance: embeddings and LM head (fetched once)
      stream_queue: appliance://node3:8001     # or redis://host:6379/0
      stream_run_id: run-7                     # `eagle3-appliance produce -c dflash.yaml --capture dflash:...`
      stream_read_ahead: 2                     # samples claimed in the background (default 2)
      train_shuffle: true                      # ours: the order of the train loader (upstream always shuffles)

The recipe sets up exactly as with ``remote`` (:func:`eagle3_client.automodel.remote_dflash_recipe`:
a config-only target, the embeddings and LM head fetched from ``remote_urls``), but its wrapper,
:class:`StreamDFlashTarget`, answers each ``generate_batch`` of the training loop with the next
batch of the stream: the current epoch's run of this data-parallel rank
(:func:`~eagle3_client.automodel_stream.stream_run_id`), read through
:class:`~eagle3_client.streaming.loader.DFlashFeatureLoader` in the order the producer put it;
when a run ends (closed: every sample acked) the next call moves on to the next epoch's run.

Unlike the EAGLE-3 path (whose loop takes its batches from the stream and never iterates its own
dataloader, so it has no limit on the order), the DFlash loop iterates its own dataloader and
passes each batch to ``generate_batch``. The stream's batch must therefore be that batch: every
call checks that the stream batch's ``input_ids`` and ``loss_mask`` equal the recipe's, and
refuses (:class:`StreamOrderMismatch`) rather than train on other data. To make the trainer's
order the producer's, the stream backend builds the train loader with a ``DistributedSampler``
for every rank count, one rank included (upstream's DFlash recipe uses one only under
``torchrun``; alone it shuffles with the global RNG, an order no producer can know), with
``shuffle`` from ``recipe_args.train_shuffle`` (default true, as upstream always shuffles):
exactly the sampler ``eagle3-appliance produce -c`` builds. With one trainer and shuffling, such
a run therefore sees each epoch's samples in the sampler's order, not in the order a co-located
single-process run would draw (as the EAGLE-3 stream does); with ``train_shuffle: false`` or under
``torchrun`` the order is the co-located one. A YAML whose data or ``micro_batch_size`` differs
from the producer's, or a producer started with another ``--trainers``, is refused by the check.

Before the first batch of each run the run's capture (``store.description.capture``) must equal
the recipe's (its layers and whether it captures the logits): a run produced with another
``--capture`` is refused with :class:`~eagle3_client.streaming.queues.RunMismatch`.

DSpark (``TrainDSparkRecipe``, text targets) works the same way: its loop also iterates its own
``build_eagle3_dataloader`` loader and passes each batch (padded or packed) to ``generate_batch``;
:class:`StreamDSparkTarget` reads the run through
:class:`~eagle3_client.streaming.loader.DSparkFeatureLoader` and checks the same two tensors. Its
runs are produced with ``--capture dspark:...`` (the layers the recipe logs). A ``multimodal: true``
or ``cached_target_path`` DSpark run has no stream backend (refused at setup).

ViSpec's stage 2 (``TrainVispecRecipe``) too: its loop iterates its own VLM loader
(``build_dspark_vlm_dataloader``, swapped the same way for the producer's sampler) and passes each
batch with its vision inputs; :class:`StreamVispecTarget` reads the run through
:class:`~eagle3_client.streaming.loader.VispecFeatureLoader`. The check compares the ids and masks
of the request each sample was computed from (the loader's ``inputs``), for every family.
Validation (``val_data_path``) is not on the stream: it runs on the ``remote_urls`` appliances,
as with ``remote``. Resuming mid-epoch from a checkpoint is refused by the check (the recipe
restarts the epoch at its first batch, the run's acked samples are not delivered again).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from eagle3_client.automodel_stream import STREAM_BACKEND, StreamSettings, stream_run_id
from eagle3_client.capture import Capture
from eagle3_client.dflash import RemoteDFlashTargetModel
from eagle3_client.streaming.queues import RunMismatch, StreamError

__all__ = [
    "STREAM_BACKEND",
    "RankMesh",
    "StreamDFlashTarget",
    "StreamDSparkTarget",
    "StreamOrderMismatch",
    "StreamVispecTarget",
    "stream_train_loader",
]

logger = logging.getLogger(__name__)


class StreamOrderMismatch(StreamError):
    """The stream's next batch is not the batch the recipe is training on (another order or dataset)."""


class RankMesh:
    """The ``dp_mesh`` a dataloader builder reads one rank's ``DistributedSampler`` from (no process group)."""

    def __init__(self, size: int, rank: int) -> None:
        self._size, self._rank = int(size), int(rank)

    def size(self) -> int:
        return self._size

    def get_local_rank(self) -> int:
        return self._rank


def stream_train_loader(
    build: Callable[..., Any], recipe_cfg: Any, dp_mesh: Any, world_size: int, rank: int
) -> Callable[..., Any]:
    """``build_eagle3_dataloader`` as the stream backend calls it for the train loader.

    Upstream's DFlash setup builds its train loader with ``shuffle=True`` and its validation
    loader with ``shuffle=False``; the train one gets a ``DistributedSampler`` over the
    data-parallel ranks (``dp_mesh``, or ``world_size`` x ``rank``) and ``train_shuffle``.
    """
    shuffle = bool(recipe_cfg.get("train_shuffle", True))

    def build_loader(*args: Any, **kwargs: Any) -> Any:
        if not kwargs.get("shuffle", False):
            return build(*args, **kwargs)  # the validation loader: unchanged
        mesh = dp_mesh if dp_mesh is not None else RankMesh(world_size, rank)
        return build(*args, **{**kwargs, "shuffle": shuffle, "distributed": True, "dp_mesh": mesh})

    return build_loader


class StreamDFlashTarget:
    """The DFlash recipe's ``target_wrapper`` on the stream (module docstring).

    ``remote``: the recipe's remote wrapper (embeddings, LM head, validation batches);
    ``settings``: the ``stream_*`` keys; ``rank``: the data-parallel rank; ``epochs``: the
    recipe's ``num_epochs``; ``device``: where the batches go; ``options``: the client options
    of the claims.
    """

    def __init__(
        self,
        remote: Any,
        settings: StreamSettings,
        *,
        rank: int,
        epochs: int,
        device: torch.device | str = "cpu",
        options: dict[str, Any] | None = None,
    ) -> None:
        self.remote = remote
        self.settings = settings
        self.rank = int(rank)
        self.epochs = int(epochs)
        self.device = torch.device(device)
        self.target_layer_ids = list(getattr(remote, "target_layer_ids", ()))  # ViSpec: none
        self.capture_logits = bool(getattr(remote, "capture_logits", False))  # DSpark: none
        self.capture = self._capture_of(remote)
        self.urls = getattr(remote, "urls", "")
        self._options = dict(options or {})
        self._epoch = 0
        self._run: tuple[Any, Any, Any] | None = None  # (queue, store, loader) of the current epoch
        self._live = False  # validation: batches from the appliances, not the stream

    def _capture_of(self, remote: RemoteDFlashTargetModel) -> Capture:
        """The capture the recipe's wrapper asks for (the runs must have been produced with it)."""
        return Capture.dflash(self.target_layer_ids, logits=self.capture_logits)

    def _loader(self, queue: Any, store: Any) -> Any:
        from eagle3_client.streaming.loader import DFlashFeatureLoader

        return DFlashFeatureLoader(queue, store)

    # -- what the recipe calls ----------------------------------------------------------

    def get_input_embeddings(self) -> Any:
        return self.remote.get_input_embeddings()

    def get_output_embeddings(self) -> Any:
        return self.remote.get_output_embeddings()

    def generate_batch(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor, **extra: Any
    ) -> Any:
        """The stream's next batch, which must be this one: the request it was computed from has the
        recipe's ``input_ids`` and ``loss_mask``. ``extra``: packing, or a ViSpec batch's vision inputs
        (not kept on the stream, so not compared: the ids and masks are)."""
        if self._live:
            return self.remote.generate_batch(input_ids, attention_mask, loss_mask, **extra)
        batch, inputs = self._next()
        for name, mine in (("input_ids", input_ids), ("loss_mask", loss_mask)):
            theirs = inputs[name]
            if theirs.shape != mine.shape or not torch.equal(theirs, mine.to(theirs.device)):
                run = stream_run_id(self.settings.run_id, self._epoch, self.rank)
                raise StreamOrderMismatch(
                    f"the stream's next batch of run {run!r} has other {name} ({list(theirs.shape)}) than the "
                    f"batch the recipe is training on ({list(mine.shape)}): the run was produced for another "
                    "order, dataset or rank count. Produce it with `eagle3-appliance produce -c` and this YAML "
                    "(--trainers = the data-parallel ranks); a checkpoint resumed mid-epoch is refused too"
                )
        return batch

    # -- the recipe subclass's hooks ----------------------------------------------------

    def start(self, epoch: int) -> None:
        """The training loop begins at ``epoch`` (0, or the checkpoint's)."""
        self._epoch = int(epoch)

    @contextmanager
    def live(self) -> Iterator[None]:
        """Batches asked for within (validation) are computed by the appliances, as with ``remote``."""
        self._live = True
        try:
            yield
        finally:
            self._live = False

    def finish(self, *, ack: bool) -> None:
        """End the current run: ``ack`` the last batch (the loop trained it) or leave it to be redelivered."""
        if self._run is None:
            return
        queue, store, loader = self._run
        self._run = None
        try:
            if ack:
                loader.close()
            else:
                queue.close()
        finally:
            store.close()

    def close(self) -> None:
        self.finish(ack=False)
        self.remote.close()

    # -- the stream ---------------------------------------------------------------------

    def _next(self) -> tuple[Any, dict[str, torch.Tensor]]:
        """The next batch of the stream and the request tensors it was computed from."""
        while True:
            if self._run is None:
                self._open()
            assert self._run is not None
            loader = self._run[2]
            try:
                return next(loader), loader.inputs
            except StopIteration:
                self.finish(ack=True)
                self._epoch += 1

    def _open(self) -> None:
        from eagle3_client.streaming.open import open_stream

        if self._epoch >= self.epochs:
            raise StreamOrderMismatch(
                f"the recipe asks for more batches than its {self.epochs} epoch(s) of runs "
                f"{self.settings.run_id!r} hold: the runs were produced for another dataset or batch size"
            )
        run_id = stream_run_id(self.settings.run_id, self._epoch, self.rank)
        queue, store = open_stream(
            self.settings.queue,
            run_id=run_id,
            device=self.device,
            read_ahead=self.settings.read_ahead,
            in_order=True,  # the producer put the recipe's order: train in it
            **self._options,
        )
        try:
            theirs = str(store.description.capture)
            if theirs != self.capture.spec:
                raise RunMismatch(
                    f"run {run_id!r} was produced with capture {theirs!r}; this recipe captures "
                    f"{self.capture.spec!r}: produce it with `eagle3-appliance produce -c <this YAML> "
                    f"--capture {self.capture.spec}`"
                )
            loader = self._loader(queue, store)
        except BaseException:
            queue.close()
            store.close()
            raise
        logger.info(
            "epoch %d of rank %d from the stream: run %s (%s) on %s",
            self._epoch,
            self.rank,
            run_id,
            self.capture.spec,
            self.settings.queue,
        )
        self._run = (queue, store, loader)


class StreamDSparkTarget(StreamDFlashTarget):
    """The DSpark recipe's ``target_wrapper`` on the stream: upstream's ``DSparkTargetBatch`` of each run."""

    def _capture_of(self, remote: Any) -> Capture:
        return Capture.dspark(self.target_layer_ids)

    def _loader(self, queue: Any, store: Any) -> Any:
        from eagle3_client.streaming.loader import DSparkFeatureLoader

        return DSparkFeatureLoader(queue, store)


class StreamVispecTarget(StreamDFlashTarget):
    """ViSpec's (stage 2) ``target_wrapper`` on the stream: upstream's ``VispecTargetBatch`` of each run.

    The recipe's loop passes each batch's vision inputs; the stream's sample was computed from the
    same batch (its ids and masks are checked; the pixels are not kept on the stream)."""

    def _capture_of(self, remote: Any) -> Capture:
        return Capture.vispec()

    def get_lm_head(self) -> Any:
        return self.remote.get_lm_head()

    def _loader(self, queue: Any, store: Any) -> Any:
        from eagle3_client.streaming.loader import VispecFeatureLoader

        return VispecFeatureLoader(queue, store)
