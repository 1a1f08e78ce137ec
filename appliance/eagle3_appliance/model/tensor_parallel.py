"""Tensor-parallel serving: this process is rank 0 and drives N-1 worker processes in lockstep.

``serve --tensor-parallel-size N`` starts everything from one command:

* rank 0 (the HTTP process) starts ranks 1..N-1 as ``python -m eagle3_appliance.model.tensor_parallel``
  children, each joined to it by a socket pair (the *control channel*), and all N join one
  ``torch.distributed`` group (NCCL on GPUs, rank r on GPU r; gloo on the CPU) through a
  TCP store on 127.0.0.1. Each rank then loads its shards with transformers' tensor-parallel
  plan (:func:`eagle3_appliance.model.checkpoint.build_model`).
* Per forward, rank 0 sends the step's ``input_ids`` and ``attention_mask`` (and a packed
  request's packing, a request's vision tensors) over every control channel and runs its own
  forward; the workers run the same ``Target.forward`` (a ViSpec or MSD capture: the same
  :func:`eagle3_appliance.model.vlm.forward`) on the same inputs, and the collectives inside the forward
  keep the ranks together. The aux layers' outputs and the logits are whole (replicated,
  gathered) tensors on every rank; rank 0 keeps them and answers, the workers drop theirs.
  Rank 0 owns HTTP and every data plane.
* Control messages, not a collective, carry the inputs, so an idle worker waits on a socket
  and never in a collective that NCCL's watchdog would time out.

Failure (docs/large-targets.md): a worker that exits is seen at once (its channel closes); one
that sends no heartbeat for ``--tensor-parallel-timeout`` seconds, or leaves a forward step
unfinished for ``--request-timeout`` seconds, counts as hung. Either way the target reports the
fault (``/health/ready`` answers 503 with it), new forwards are refused with 503, the other
workers are killed, and :data:`EXIT_DELAY` seconds later the process exits with
:data:`EXIT_RANK_FAILED`, so Slurm and Docker see a failed server. Workers ignore SIGTERM and
SIGINT (rank 0 drains and then ends them) and die with rank 0 (parent-death signal, closed channel).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from multiprocessing.connection import Connection, wait
from typing import Any

import torch

from eagle3_appliance.core.inputs import GenerateInputs, Packing
from eagle3_appliance.errors import InvalidRequest, Unavailable
from eagle3_appliance.model import checkpoint, vlm
from eagle3_appliance.model.target import Target
from eagle3_appliance.model.threads import apply_intra_op_threads
from eagle3_appliance.settings import Settings
from eagle3_client.capture import Capture

__all__ = [
    "EXIT_DELAY",
    "EXIT_RANK_FAILED",
    "HEARTBEAT_INTERVAL",
    "RankFailed",
    "TensorParallelGroup",
    "load_tensor_parallel",
]

logger = logging.getLogger(__name__)

# The exit code of a server whose tensor-parallel rank failed (1 is a forced drain).
EXIT_RANK_FAILED = 3
# Seconds between a rank's failure and the exit: /health/ready answers 503 with the reason meanwhile.
EXIT_DELAY = 2.0
# Seconds between two heartbeats of a worker.
HEARTBEAT_INTERVAL = 0.5
# Seconds for the ranks to meet in the process group and to load their shards.
STARTUP_TIMEOUT = 3600.0
# Seconds for a rank's interpreter to start and import torch (before its first heartbeat).
PROCESS_START_TIMEOUT = 300.0


class RankFailed(Unavailable):
    """A forward on a tensor-parallel target whose group has failed (503: the server is about to exit)."""


@dataclass
class WorkerConfig:
    """What rank 0 sends a worker first, over its control channel."""

    rank: int
    world_size: int
    settings: Settings
    device_type: str
    dtype: str
    store_port: int
    collective_timeout: float


@dataclass
class _Worker:
    rank: int
    proc: subprocess.Popen[bytes]
    conn: Connection
    last_beat: float = field(default_factory=time.monotonic)
    heard: bool = False  # its first message came: the interpreter is up, heartbeats count from now
    done_step: int = 0
    loaded: list[str] | None = None


def _backend(device_type: str) -> str:
    return "nccl" if device_type == "cuda" else "gloo"


def _collective_timeout(settings: Settings) -> float:
    """Collectives may wait as long as a request may; the group's own watch ends a hang first."""
    return settings.request_timeout + 60.0


def _init_group(rank: int, world_size: int, device_type: str, store: Any, timeout: float) -> None:
    # transformers reads these to bind rank r to device r and to size its mesh.
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    device_id = None
    if device_type == "cuda":
        torch.cuda.set_device(rank)
        device_id = torch.device("cuda", rank)
    torch.distributed.init_process_group(
        _backend(device_type),
        store=store,
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout),
        device_id=device_id,
    )


class TensorParallelGroup:
    """Rank 0's side of the group: starts the workers, mirrors each forward to them, watches them.

    Implements :class:`eagle3_appliance.model.target.Lockstep`. ``step`` is called on the model thread
    only; the watch runs on its own thread and only reads the control channels.
    """

    def __init__(self, settings: Settings, device_type: str) -> None:
        self.settings = settings
        self.device_type = device_type
        self.world_size = settings.tensor_parallel_size
        self.workers: list[_Worker] = []
        self.failure: str | None = None
        self.closing = False
        self._step = 0
        self._own_done = 0
        self._step_started: float | None = None
        self._lock = threading.Lock()
        self._loaded = threading.Event()
        self._watch: threading.Thread | None = None

    # -- startup ----------------------------------------------------------------------------

    def start(self, dtype: torch.dtype) -> None:
        """Start ranks 1..N-1 and join the process group as rank 0 (returns once all have joined)."""
        store = torch.distributed.TCPStore(
            "127.0.0.1",
            0,
            self.world_size,
            is_master=True,
            timeout=timedelta(seconds=STARTUP_TIMEOUT),
            wait_for_workers=False,
        )
        for rank in range(1, self.world_size):
            config = WorkerConfig(
                rank=rank,
                world_size=self.world_size,
                settings=self.settings,
                device_type=self.device_type,
                dtype=str(dtype).removeprefix("torch."),
                store_port=store.port,
                collective_timeout=_collective_timeout(self.settings),
            )
            self.workers.append(self._spawn(config))
        self._watch = threading.Thread(target=self._watch_forever, name="tp-watch", daemon=True)
        self._watch.start()
        apply_intra_op_threads(self.settings, self.device_type, self.world_size)  # the ranks share the CPUs
        _init_group(0, self.world_size, self.device_type, store, _collective_timeout(self.settings))
        self._store = store  # the workers' rendezvous lives as long as the group

    def _spawn(self, config: WorkerConfig) -> _Worker:
        ours, theirs = socket.socketpair()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen(
            [sys.executable, "-m", "eagle3_appliance.model.tensor_parallel", str(theirs.fileno()), str(os.getpid())],
            pass_fds=[theirs.fileno()],
            env=env,
        )
        theirs.close()
        conn = Connection(ours.detach())
        conn.send(config)
        logger.info("tensor parallel: started rank %d of %d (pid %d)", config.rank, config.world_size, proc.pid)
        return _Worker(config.rank, proc, conn)

    def wait_loaded(self, own_lines: list[str]) -> None:
        """Wait until every worker has loaded its shards, then log the placement of every rank."""
        while not self._loaded.wait(0.5):
            if self.failure is not None:
                raise SystemExit(EXIT_RANK_FAILED)  # the reason is logged
        lines = list(own_lines)
        for worker in self.workers:
            lines += worker.loaded or []
        for line in lines:
            logger.info("placement %s", line)

    # -- Lockstep ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def step(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        capture_hidden: bool,
        packing: Packing | None = None,
        vision: Mapping[str, torch.Tensor] | None = None,
        vlm_capture: str | None = None,
    ) -> Iterator[None]:
        """Send one forward to every worker; the block runs rank 0's own forward.

        ``vision``: the request's vision tensors, sent as their bytes and dtype (:func:`_tensor_message`);
        ``vlm_capture``: a ViSpec or MSD capture, whose call every worker makes instead of the forward."""
        if self.failure is not None:
            raise RankFailed(f"the tensor-parallel group has failed: {self.failure}; the server is exiting")
        packed = None if packing is None else tuple(t.cpu().numpy() for t in _packing_tensors(packing))
        arrays = (input_ids.cpu().numpy(), attention_mask.cpu().numpy())
        images = {name: _tensor_message(t) for name, t in (vision or {}).items()}
        message = ("forward", self._step + 1, *arrays, capture_hidden, packed, images, vlm_capture)
        with self._lock:
            self._step += 1
            self._step_started = time.monotonic()
        try:
            for worker in self.workers:
                worker.conn.send(message)
            yield
        except Exception as exc:
            if vision and vlm.request_fault(exc, vision) and self.failure is None:
                # The model refused the request's vision inputs: every rank runs the same code on
                # the same inputs and stops at the same point (the workers report the step done),
                # so the ranks stay in step; the request gets a 422. A rank that does not finish
                # the step still fails the group by the step's deadline.
                with self._lock:
                    self._own_done = self._step
                    self._settle()
                raise
            # A collective fails when a peer is gone: name the rank rather than the socket error.
            deadline = time.monotonic() + 2 * HEARTBEAT_INTERVAL + 1.0
            while self.failure is None and time.monotonic() < deadline:
                time.sleep(0.05)
            if self.failure is None:  # rank 0's own forward failed: the other ranks are out of step now
                self.fail(f"rank 0's forward failed ({type(exc).__name__}: {exc}); the ranks are out of step")
            raise RankFailed(f"the tensor-parallel group failed during this forward: {self.failure}") from exc
        with self._lock:
            self._own_done = self._step
            self._settle()

    def faults(self) -> list[str]:
        return [] if self.failure is None else [f"tensor-parallel rank failed: {self.failure}"]

    # -- the watch ----------------------------------------------------------------------------

    def _settle(self) -> None:
        """Under the lock: the step is over once rank 0 and every worker finished it."""
        if self._step_started is not None and self._own_done == self._step:
            if all(w.done_step == self._step for w in self.workers):
                self._step_started = None

    def _watch_forever(self) -> None:
        conns = {w.conn: w for w in self.workers}
        while self.failure is None and not self.closing:
            for conn in wait(list(conns), timeout=0.25):
                worker = conns[conn]  # type: ignore[index]
                try:
                    self._handle(worker, worker.conn.recv())
                except (EOFError, OSError):
                    if self.closing:
                        return
                    code = worker.proc.wait(timeout=5) if worker.proc.poll() is None else worker.proc.returncode
                    self.fail(f"rank {worker.rank} (pid {worker.proc.pid}) exited with code {code}")
                    return
            self._check_deadlines(time.monotonic())

    def _handle(self, worker: _Worker, message: tuple[Any, ...]) -> None:
        kind = message[0]
        worker.last_beat = time.monotonic()
        worker.heard = True
        if kind == "done":
            with self._lock:
                worker.done_step = int(message[1])
                self._settle()
        elif kind == "loaded":
            worker.loaded = list(message[1])
            if all(w.loaded is not None for w in self.workers):
                self._loaded.set()
        elif kind == "error":
            self.fail(f"rank {worker.rank} failed: {message[1]}")

    def _check_deadlines(self, now: float) -> None:
        timeout = self.settings.tensor_parallel_timeout
        for worker in self.workers:
            if not worker.heard and now - worker.last_beat > PROCESS_START_TIMEOUT:
                self.fail(
                    f"rank {worker.rank} (pid {worker.proc.pid}) did not start within {PROCESS_START_TIMEOUT:g} s"
                )
                return
            if worker.heard and now - worker.last_beat > timeout:
                self.fail(f"rank {worker.rank} (pid {worker.proc.pid}) sent no heartbeat for {timeout:g} s (hung)")
                return
        with self._lock:
            started, step = self._step_started, self._step
        if started is not None and now - started > self.settings.request_timeout:
            late = [str(w.rank) for w in self.workers if w.done_step != step] or ["0"]
            self.fail(
                f"forward step {step} not finished by rank(s) {', '.join(late)} within "
                f"--request-timeout {self.settings.request_timeout:g} s (hung)"
            )

    def fail(self, reason: str) -> None:
        """The group can no longer compute: report it, end the workers, exit :data:`EXIT_DELAY` s later."""
        with self._lock:
            if self.failure is not None or self.closing:
                return
            self.failure = reason
        logger.error(
            "tensor parallel: %s; the server is not ready and exits with code %d in %g s",
            reason,
            EXIT_RANK_FAILED,
            EXIT_DELAY,
        )
        for worker in self.workers:
            if worker.proc.poll() is None:
                worker.proc.kill()
        timer = threading.Timer(EXIT_DELAY, _exit_now, (EXIT_RANK_FAILED,))
        timer.daemon = True
        timer.start()

    # -- shutdown ---------------------------------------------------------------------------

    def close(self, timeout: float = 10.0) -> None:
        """A normal stop: tell the workers to leave, then end whichever has not."""
        with self._lock:
            if self.closing:
                return
            self.closing = True
        for worker in self.workers:
            with contextlib.suppress(OSError):
                worker.conn.send(("stop",))
        deadline = time.monotonic() + timeout
        for worker in self.workers:
            try:
                worker.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                worker.proc.kill()
                worker.proc.wait()
            worker.conn.close()


def _packing_tensors(packing: Packing) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return packing.position_ids, packing.seq_lens, packing.doc_remaining


def _tensor_message(tensor: torch.Tensor) -> tuple[str, tuple[int, ...], Any]:
    """A tensor as plain bytes for a control message: pickling a tensor itself would pass shared
    memory between processes, and numpy has no bfloat16."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape), flat.view(torch.uint8).numpy()


def _tensor_from_message(message: tuple[str, tuple[int, ...], Any]) -> torch.Tensor:
    dtype, shape, data = message
    return torch.from_numpy(data).view(getattr(torch, dtype)).reshape(shape)


def _exit_now(code: int) -> None:
    logging.shutdown()
    os._exit(code)


def load_tensor_parallel(settings: Settings, device: torch.device, dtype: torch.dtype) -> Target:
    """Rank 0 of ``--tensor-parallel-size N``: start the other ranks, load this rank's shards, wait for all."""
    import atexit

    size = settings.tensor_parallel_size
    if device.type == "cpu" and torch.cuda.is_available():
        raise ValueError(
            "--tensor-parallel-size with --device cpu on a machine with GPUs: hide them (CUDA_VISIBLE_DEVICES=) "
            "to shard on the CPU, or use --device cuda"
        )
    if device.type == "cuda" and torch.cuda.device_count() < size:
        raise ValueError(
            f"--tensor-parallel-size {size} needs {size} visible GPUs, this node shows {torch.cuda.device_count()} "
            "(CUDA_VISIBLE_DEVICES)"
        )
    checkpoint.resolve_source(settings)  # the built-in model is written once, before the workers read it
    group = TensorParallelGroup(settings, device.type)
    atexit.register(group.close)
    group.start(dtype)
    model = checkpoint.build_model(settings, device, dtype)
    target = Target(model, settings.aux_layer_ids, name=settings.model, mode=settings.placement_mode, lockstep=group)
    target.gathered_input_embeddings = gather_input_embeddings(model)
    target.gathered_lm_head = gather_lm_head(model)
    group.wait_loaded(checkpoint.placement_lines(model, target.layers, settings.placement_mode, rank=0))
    return target


def gather_input_embeddings(model: Any) -> torch.Tensor | None:
    """The whole input embedding on the host, or None when it is not sharded (every rank calls this once).

    ``/input_embeddings`` sends it; gathering it once at load time keeps collectives out of
    everything but the forward.
    """
    weight = model.get_input_embeddings().weight
    if not callable(getattr(weight, "full_tensor", None)):
        return None
    full: torch.Tensor = weight.full_tensor()
    return full.to("cpu")


def gather_lm_head(model: Any) -> torch.Tensor | None:
    """The whole LM head weight on the host, or None when it is not sharded (every rank calls this once).

    A DFlash client fetches it (``/lm_head_rows``): its draft reuses the head, frozen.
    """
    weight = getattr(model.get_output_embeddings(), "weight", None)
    if not callable(getattr(weight, "full_tensor", None)):
        return None
    full: torch.Tensor = weight.full_tensor()  # type: ignore[union-attr]
    return full.to("cpu")


# -- the worker process ---------------------------------------------------------------------------


def _die_with_parent(parent_pid: int) -> None:
    """Linux: SIGKILL this process when rank 0 dies, even if it is stuck in a collective."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent_pid:  # rank 0 died before the call above
        os._exit(1)


def worker_main(fd: int, parent_pid: int) -> int:
    """Rank r > 0: load this rank's shards, then run every forward rank 0 sends, until it says stop."""
    _die_with_parent(parent_pid)
    for sig in (signal.SIGTERM, signal.SIGINT):  # rank 0 drains first, then ends the workers
        signal.signal(sig, signal.SIG_IGN)
    conn = Connection(fd)
    config: WorkerConfig = conn.recv()
    logging.basicConfig(
        level=config.settings.log_level.upper(),
        format=f"%(asctime)s %(levelname)s [rank {config.rank}] %(name)s: %(message)s",
    )
    send_lock = threading.Lock()

    def send(message: tuple[Any, ...]) -> None:
        with send_lock:
            conn.send(message)

    def beat() -> None:
        while True:
            try:
                send(("beat",))
            except OSError:  # rank 0 is gone
                os._exit(1)
            time.sleep(HEARTBEAT_INTERVAL)

    threading.Thread(target=beat, name="tp-heartbeat", daemon=True).start()
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        apply_intra_op_threads(config.settings, config.device_type, config.world_size)
        store = torch.distributed.TCPStore(
            "127.0.0.1",
            config.store_port,
            config.world_size,
            is_master=False,
            timeout=timedelta(seconds=STARTUP_TIMEOUT),
        )
        _init_group(config.rank, config.world_size, config.device_type, store, config.collective_timeout)
        device = torch.device(config.device_type, config.rank) if config.device_type == "cuda" else torch.device("cpu")
        dtype = getattr(torch, config.dtype)
        model = checkpoint.build_model(config.settings, device, dtype)
        target = Target(model, config.settings.aux_layer_ids, mode=config.settings.placement_mode)
        gather_input_embeddings(model)  # the collective rank 0 makes at the same point (rank 0 keeps the copy)
        gather_lm_head(model)  # likewise
        send(("loaded", checkpoint.placement_lines(model, target.layers, config.settings.placement_mode, config.rank)))
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):  # rank 0 is gone
                return 1
            if message[0] == "stop":
                return 0
            _, step, input_ids, attention_mask, capture_hidden, packed, images, vlm_capture = message
            ids = torch.from_numpy(input_ids).to(device)
            mask = torch.from_numpy(attention_mask).to(device)
            packing = None if packed is None else Packing(*(torch.from_numpy(a).to(device) for a in packed))
            vision = {name: _tensor_from_message(m).to(device) for name, m in images.items()}
            try:
                if vlm_capture is not None:  # ViSpec or MSD: the same call rank 0 makes
                    capture = Capture.from_json({"kind": vlm_capture})
                    vlm.forward(target, capture, GenerateInputs(ids, mask, mask, None, vision))
                else:
                    target.forward(ids, mask, capture_hidden=capture_hidden, packing=packing, vision=vision)
            except Exception as exc:
                if not (isinstance(exc, InvalidRequest) or vlm.request_fault(exc, vision)):
                    raise
                # Rank 0 refused the same inputs at the same point (TensorParallelGroup.step).
            send(("done", step))
    except Exception as exc:  # noqa: BLE001 - reported to rank 0, which exits
        logging.getLogger(__name__).error("rank %d failed:\n%s", config.rank, traceback.format_exc())
        with contextlib.suppress(OSError):
            send(("error", f"{type(exc).__name__}: {exc}"))
        return 1


if __name__ == "__main__":
    exit_code = worker_main(int(sys.argv[1]), int(sys.argv[2]))
    logging.shutdown()
    os._exit(exit_code)  # without waiting for the process group's teardown
