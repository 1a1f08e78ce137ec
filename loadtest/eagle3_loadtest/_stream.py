"""Ranks as stream consumers (``--stream-queue``): each rank leases from a run, through ``open_stream``.

With ``--stream-queue URL`` every rank of the scenario, instead of sending ``/generate``, iterates
upstream's ``FeatureDataLoader`` over ``open_stream(URL, run_id=--stream-run-id,
read_ahead=--stream-read-ahead)`` (data plane: the wire, which gevent can wait on). Each batch is a
``STREAM generate`` row whose time is the rank's wait for it (the loader's ``next()``: the ack of
the previous batch, the lease, the claim), checked like a ``/generate`` answer as far as the
stream allows (the request is not known to a consumer: shapes, dtypes, masks, probabilities). The
verdict, the limits and the capacity search read that row as they read ``POST generate``: the
capacity search finds how many trainers (ranks stepping every ``--think-time``) a fleet feeds.

The run comes from either:

* a producer this Locust process starts (``--stream-produce N``): on the master (or the only
  process) at the test's start, ``{python} -m eagle3_appliance produce`` over ``--stream-urls``
  (default ``--host``) with N batches drawn like the ranks' own (``--batch-size``, ``--seq-len``,
  ``--seed``); its run id is ``--stream-run-id`` or a fresh one, sent to the workers. At the
  end it is stopped and the run's answers dropped from the appliances (``DELETE /stream/runs/<run>``);
* or one the user started (``--stream-produce 0``, the default): ``--stream-run-id`` names it.

A rank whose run is closed (every sample acked) stops. Size ``--stream-produce`` above
``users x run time / think time`` for a whole run.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import random
import shlex
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import gevent
import torch
from locust import events
from locust.env import Environment
from locust.runners import WorkerRunner

from eagle3_client import protocol
from eagle3_loadtest._batches import BatchSpec, make_batch, make_vocab_mapping
from eagle3_loadtest._options import RunSettings

__all__ = ["PRODUCER", "StreamProducer", "write_dataset"]

logger = logging.getLogger(__name__)

_INFO_TIMEOUT_S = 30.0
_LIBRARIES = ("nemo_automodel.components.speculative.streaming", "eagle3_client.streaming.open")


def _post_json(url: str, token: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    headers = {"Content-Type": "application/json"}
    if token:
        headers[protocol.AUTH_HEADER] = f"Bearer {token}"
    data = json.dumps(body or {}).encode()
    with urllib.request.urlopen(urllib.request.Request(url, data, headers), timeout=_INFO_TIMEOUT_S) as r:
        return dict(json.loads(r.read()))


def _delete(url: str, token: str) -> None:
    headers = {protocol.AUTH_HEADER: f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers, method="DELETE"), timeout=10):
            pass
    except OSError as exc:  # best effort: the appliance may be gone, or never kept the run
        logger.info("DELETE %s: %s", url, exc)


def write_dataset(settings: RunSettings, vocab_size: int, folder: Path) -> tuple[Path, Path]:
    """``--stream-produce`` batches as JSONL rows (in batch order, unpadded) and the draft vocabulary file."""
    spec = BatchSpec(
        batch_size=settings.batch_size,
        lengths=settings.lengths,
        vocab_size=vocab_size,
        padding=settings.padding,
        prompt_fraction=settings.prompt_fraction,
    )
    rng = random.Random(f"{settings.seed}:stream")
    rows = folder / "rows.jsonl"
    with rows.open("w") as f:
        for _ in range(settings.stream_produce):
            batch = make_batch(spec, rng)
            for i in range(settings.batch_size):
                n = int(batch["attention_mask"][i].sum())
                row = {k: batch[k][i, :n].tolist() for k in ("input_ids", "attention_mask", "loss_mask")}
                f.write(json.dumps(row) + "\n")
    mapping = folder / "mapping.pt"
    torch.save(make_vocab_mapping(vocab_size, settings.draft_vocab, settings.seed), mapping)
    return rows, mapping


class StreamProducer:
    """The producer subprocess of ``--stream-produce`` (module docstring)."""

    def __init__(self, settings: RunSettings, host: str) -> None:
        self.settings = settings
        self.urls = [u.rstrip("/") for u in (settings.stream_urls or host).split(",") if u.strip()]
        self.folder = Path(tempfile.mkdtemp(prefix="eagle3-locust-stream-"))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, run_id: str) -> None:
        settings = self.settings
        info = _post_json(self.urls[0] + protocol.path(protocol.EP_MODEL_INFO), settings.auth_token)
        rows, mapping = write_dataset(settings, int(info["vocab_size"]), self.folder)
        command = [sys.executable, "-m", "eagle3_appliance", "produce", "--urls", ",".join(self.urls)]
        command += ["--queue", settings.stream_queue, "--run-id", run_id, "--dataset", str(rows)]
        command += ["--batch-size", str(settings.batch_size), "--vocab-mapping", str(mapping)]
        command += ["--visibility-timeout", str(settings.stream_visibility_timeout)]
        env = dict(os.environ)
        if settings.auth_token:
            env["EAGLE3_AUTH_TOKEN"] = settings.auth_token
        log = (self.folder / "producer.log").open("wb")
        logger.info("stream: producing %d batches as run %s: %s", settings.stream_produce, run_id, shlex.join(command))
        self.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        self.run_id = run_id

    def stop(self) -> None:
        """Stop it if the run is not done, and drop what the appliances keep of the run."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
            for url in self.urls:
                _delete(f"{url}{protocol.path(protocol.EP_STREAM_RUNS)}/{self.run_id}", self.settings.auth_token)
        tail = (self.folder / "producer.log").read_text(errors="replace").strip().splitlines()[-3:]
        logger.info("stream: producer exited with %s: %s", self.proc.returncode, " | ".join(tail))
        self.proc = None


PRODUCER: list[StreamProducer] = []  # the one this process started, if any


def _load_libraries() -> bool:
    """Import the consumer's libraries (seconds: torch's extensions, upstream's package); True if it did now.

    Done before users start, not in a rank's first task, which would block every greenlet.
    """
    if all(name in sys.modules for name in _LIBRARIES):
        return False
    for name in _LIBRARIES:
        importlib.import_module(name)
    gevent.get_hub().loop.update_now()  # as _scenario does: the --run-time timer must not fire early
    return True


# A worker joins its master right after loading the locustfiles, and one silent for 3 s (as an
# import of many seconds at init would keep it) is dropped: given --stream-queue (or
# LOCUST_STREAM_QUEUE) on its own command line, it loads the libraries here, before joining.
if os.environ.get("LOCUST_STREAM_QUEUE") or any(a.startswith("--stream-queue") for a in sys.argv):
    _load_libraries()


@events.init.add_listener
def _name_the_run(environment: Environment, **_kw: Any) -> None:
    """The libraries loaded before the clock starts (a worker: when given --stream-queue itself); on the
    master (or the only process), a fresh run id when the load test produces and none was given."""
    opts = environment.parsed_options
    if opts is None or not getattr(opts, "stream_queue", None):
        return
    _load_libraries()
    if isinstance(environment.runner, WorkerRunner):
        return
    if opts.stream_produce > 0 and not opts.stream_run_id:
        opts.stream_run_id = f"locust-{os.getpid()}-{time.time_ns() % 10**9}"  # sent to the workers at spawn


@events.test_start.add_listener
def _start_producer(environment: Environment, **_kw: Any) -> None:
    opts = environment.parsed_options
    if opts is not None and getattr(opts, "stream_queue", None) and _load_libraries():
        logger.warning(
            "stream: the consumer's libraries were loaded after the run started; give the workers "
            "--stream-queue too (or LOCUST_STREAM_QUEUE), so that they load them before joining the master"
        )
    if isinstance(environment.runner, WorkerRunner) or opts is None or PRODUCER:
        return
    settings = RunSettings.from_options(opts)
    if not settings.stream_queue or settings.stream_produce <= 0:
        return
    producer = StreamProducer(settings, environment.host or "")
    producer.start(settings.stream_run_id)
    PRODUCER.append(producer)


@events.quitting.add_listener
def _stop_producer(environment: Environment, **_kw: Any) -> None:
    while PRODUCER:
        PRODUCER.pop().stop()
