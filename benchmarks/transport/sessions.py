"""Server memory over many client sessions: the answers kept for resends against ``--resend-budget-mb``.

Usage::

    python -m benchmarks.transport --sessions 24                 # ~17 MB answers, budget 64 MiB
    python -m benchmarks.transport --sessions 24 --budget-mb 128

Every group session keeps its last answer for ``/data_plane/resend``. This opens ``--sessions``
clients one after the other against one server, each on the gloo tier, each getting one
answer, and keeps them all connected (as the data-parallel ranks of a trainer would be),
reading the server's resident memory (``VmRSS``) after each. Three servers, in the same run:
the wire tier (nothing kept for resends: the reference for flat memory), gloo within the
budget, and gloo with a budget too large to ever drop anything (what every session keeping its
answer costs: the baseline). The server's own ``GET /data_plane`` says how much it holds.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import httpx

from benchmarks.wire.wire_path import proc_status_kb
from eagle3_appliance.core.inputs import VocabMapping
from eagle3_appliance.launch import ServerProcess
from eagle3_client import RemoteEagle3TargetModel

__all__ = ["run_sessions"]

MB = 1e6
UNBOUNDED_MB = 1 << 20  # 1 TiB: never reached, so nothing is ever dropped


def _one_server(
    server_args: list[str], log: Path, tier: str, sessions: int, mapping: VocabMapping, batch: tuple
) -> tuple[list[float], dict]:
    """Server RSS (MB) before any session and after each one; the server's resend counters at the end."""
    rss: list[float] = []
    with ServerProcess(server_args, log_path=log, startup_timeout=600) as server, contextlib.ExitStack() as stack:
        assert server.proc is not None
        pid = server.proc.pid
        for _ in range(sessions):
            remote = stack.enter_context(
                RemoteEagle3TargetModel.from_urls([server.url], device="cpu", timeout=600, data_plane=tier)
            )
            remote.set_vocab_mapping(mapping.selected_token_ids, mapping.selected_token_mask)
            if not rss:
                rss.append(proc_status_kb(pid)[1] * 1024 / MB)
            remote.generate_batch(*batch)
            rss.append(proc_status_kb(pid)[1] * 1024 / MB)
        kept = httpx.get(server.url + "/data_plane", trust_env=False, timeout=30).json().get("resend", {})
    return rss, kept


def run_sessions(
    base_args: list[str], cache: Path, sessions: int, budget_mb: int, mapping: VocabMapping, batch: tuple, nbytes: int
) -> int:
    print(
        f"== server memory over {sessions} sessions, one {nbytes / MB:.1f} MB answer each "
        f"(resident MB after each session)"
    )
    runs = {
        "wire (reference)": ("wire", []),
        f"gloo, budget {budget_mb} MiB": ("gloo", ["--resend-budget-mb", str(budget_mb)]),
        "gloo, unbounded (baseline)": ("gloo", ["--resend-budget-mb", str(UNBOUNDED_MB)]),
    }
    results = {}
    for name, (tier, extra) in runs.items():
        results[name] = _one_server(base_args + extra, cache / "server-sessions.log", tier, sessions, mapping, batch)
    checkpoints = sorted({1, max(1, sessions // 4), max(1, sessions // 2), sessions})
    header = (
        f"{'server':<28}" + "".join(f"{f'after {n}':>11}" for n in checkpoints) + f"{'growth':>10}   held for resend"
    )
    print(header)
    for name, (rss, kept) in results.items():
        growth = rss[-1] - rss[1]
        held = f"{kept.get('held_bytes', 0) / MB:.0f} MB in {kept.get('held', 0)}, dropped {kept.get('dropped', 0)}"
        print(f"{name:<28}" + "".join(f"{rss[n]:>11.0f}" for n in checkpoints) + f"{growth:>+10.0f}   {held}")
    print("(growth: resident MB after the last session minus after the first)")
    return 0
