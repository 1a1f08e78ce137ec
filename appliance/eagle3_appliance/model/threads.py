"""The CPU threads of a server's forwards: how many (``--intra-op-threads``) and how they wait.

Why: torch sizes its OpenMP pool to every core the process may use, and each operator of a
forward ends at a barrier where the pool's threads wait for each other, by default spinning.
A serving process never has those cores to itself: its event loop receives the next bodies
and sends answers while the model thread computes, and on a shared node a load generator, a
trainer or other jobs run beside it. Once one pool thread is descheduled, every operator waits
for its next time slice while the other threads spin on CPU the rest need. On the 2-core test
VM with other jobs running, the built-in model's forward took 185-1372 ms with 2 spinning
threads, 16-23 ms with 2 threads that sleep while they wait, 14-20 ms with 1 (docs/loadtests.md).

So ``serve`` makes the pool's threads sleep while they wait (:func:`quiet_openmp_waits`), which
changes no result. The thread count stays torch's default unless asked: on the CPU the number of
threads can change the last bits of a forward, and a served answer must match the in-process
target's bits, which run with torch's default.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

from eagle3_appliance.settings import Settings

__all__ = ["WAIT_POLICY", "apply_intra_op_threads", "intra_op_threads", "quiet_openmp_waits", "usable_cpus"]

# OpenMP's standard variable; the runtime (libgomp in torch's wheels) reads it once, when it loads.
WAIT_POLICY = "OMP_WAIT_POLICY"


def quiet_openmp_waits(environ: MutableMapping[str, str], torch_loaded: bool) -> str | None:
    """Ask for sleeping (passive) OpenMP waits unless the user chose a policy; the policy in effect.

    None when torch is already loaded with no policy set (too late to change: the runtime has
    read its environment), e.g. a server started inside a process that imported torch.
    """
    if WAIT_POLICY not in environ and not torch_loaded:
        environ[WAIT_POLICY] = "PASSIVE"
    return environ.get(WAIT_POLICY)


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask: taskset, cgroups, Slurm's binding)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity masks on this platform (macOS)
        return os.cpu_count() or 1


def intra_op_threads(requested: int, device_type: str, world_size: int, *, usable: int) -> int | None:
    """Threads for one rank's forwards: ``requested`` when set (> 0); None keeps torch's default.

    Auto keeps torch's default for one process; tensor-parallel ranks on the CPU share the
    usable CPUs (at least one each) instead of each taking all of them.
    """
    if requested > 0:
        return requested
    if device_type == "cpu" and world_size > 1:
        return max(1, usable // world_size)
    return None


def apply_intra_op_threads(settings: Settings, device_type: str, world_size: int = 1) -> int:
    """Set this process's intra-op threads from ``settings``; returns the number torch now uses."""
    import torch  # here: ``serve`` imports this module before torch loads (quiet_openmp_waits)

    threads = intra_op_threads(settings.intra_op_threads, device_type, world_size, usable=usable_cpus())
    if threads is not None and threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    return torch.get_num_threads()
