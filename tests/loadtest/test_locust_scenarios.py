"""Each load-test scenario, run headless as its own Locust process against a real appliance."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from eagle3_appliance.launch import ServerProcess, free_port
from eagle3_client import wire
from eagle3_client.protocol import SUPERVISION_KEYS

DRAFT_VOCAB = 128
SHAPES = ["--batch-size", "2", "--seq-len", "uniform:16:96", "--max-seq-len", "96", "--draft-vocab", str(DRAFT_VOCAB)]
FAULT_ROWS = {
    ("POST", "fault: malformed body"),
    ("POST", "fault: out-of-range token ids"),
    ("FAULT", "fault: hang up mid-request"),
    ("FAULT", "fault: hang up before the answer"),
    ("FAULT", "fault: slow reader"),
}


def wire_overhead(hidden_size: int, draft_vocab: int) -> int:
    """Bytes of one answer's wire headers: independent of B and T, so computed on a 1x1 answer."""
    answer = {
        "aux_hidden_states": torch.zeros(1, 1, 3 * hidden_size),
        "target_probs": torch.zeros(1, 1, draft_vocab),
        "position_mask": torch.zeros(1, 1, 1, dtype=torch.bool),
        "input_ids": torch.zeros(1, 1, dtype=torch.long),
        "loss_mask": torch.zeros(1, 1, dtype=torch.long),
    }
    assert list(answer) == list(SUPERVISION_KEYS)
    return wire.encoded_size(answer) - sum(t.numel() * t.element_size() for t in answer.values())


def count(row: dict[str, Any], column: str) -> int:
    return int(row[column])


def assert_ok(run: Any) -> None:
    assert run.returncode == 0, run.output[-4000:]


def assert_custom_metrics(report: dict[str, Any], model_info: dict[str, Any], generate_requests: int) -> None:
    m = report["custom_metrics"]
    hidden = model_info["hidden_size"]
    assert m["responses"] == generate_requests > 0
    assert m["invalid"] == 0
    # fp32 aux [T,3H], fp32 probs [T,D], bool mask [T,1], int64 ids and loss mask [T]: per token.
    assert m["supervision_bytes_per_token"] == 3 * hidden * 4 + DRAFT_VOCAB * 4 + 1 + 8 + 8
    assert m["response_bytes"] - m["payload_bytes"] == m["responses"] * wire_overhead(hidden, DRAFT_VOCAB)
    assert 0 < m["real_tokens"] <= m["tokens"]
    assert m["tokens_per_second"] > 0 and m["elapsed_s"] > 0
    assert m["tokens_per_second"] == pytest.approx(m["tokens"] / m["elapsed_s"], rel=1e-2)
    assert report["server_metrics"]["status"] in (200, 404)
    if report["server_metrics"]["status"] == 200:
        assert Path(report["server_metrics"]["file"]).stat().st_size > 0


def test_steady_from_the_whole_directory(
    locust: Any, appliance: ServerProcess, model_info: dict[str, Any], tmp_path: Path
) -> None:
    """``-f loadtest/`` loads every scenario; with none selected it runs the steady one."""
    run = locust.run(["-f", "loadtest/", "-u", "3", "-r", "3", "-t", "6s", *SHAPES], appliance.url, tmp_path / "steady")
    assert_ok(run)
    assert "capacity search shape is off" in run.output
    stats = run.stats()
    generate = stats[("POST", "generate")]
    assert count(generate, "num_failures") == 0
    assert all(count(row, "num_failures") == 0 for row in stats.values())
    assert not any(name.startswith("fault") for _, name in stats), "the fault users must not run by default"
    assert {("POST", "model_info"), ("POST", "session"), ("POST", "set_vocab_mapping")} <= set(stats)
    report = run.report()
    assert report["scenario"] == "steady" and report["verdict"] == {
        "passed": True,
        "reasons": [],
        "limits": {"max_p95_ms": 0.0, "max_error_rate": 0.0},
    }
    assert report["capacity"] is None
    assert_custom_metrics(report, model_info, count(generate, "num_requests"))
    assert ("POST", "generate") in run.csv_rows()


def test_steady_distributed(locust: Any, appliance: ServerProcess, model_info: dict[str, Any], tmp_path: Path) -> None:
    """Master plus two workers: the custom metrics add up across workers on the master."""
    port = free_port()
    prefix = tmp_path / "distributed"
    master_args = ["-f", "loadtest/steady.py", "--master", "--master-bind-port", str(port), "--expect-workers", "2"]
    master = locust.popen(
        locust.command([*master_args, "-u", "4", "-r", "4", "-t", "6s", *SHAPES], appliance.url, prefix)
    )
    worker_cmd = [sys.executable, "-m", "locust", "-f", "loadtest/steady.py", "--worker", "--master-port", str(port)]
    workers = [locust.popen(worker_cmd, quiet=True) for _ in range(2)]
    try:
        output, _ = master.communicate(timeout=locust.hard_timeout_s)
        worker_codes = [w.wait(timeout=60) for w in workers]
    finally:
        for proc in (master, *workers):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    run = locust.result(master.returncode, output, prefix)
    assert_ok(run)
    assert worker_codes == [0, 0]
    generate = run.stats()[("POST", "generate")]
    assert count(generate, "num_failures") == 0
    report = run.report()
    assert report["verdict"]["passed"]
    assert_custom_metrics(report, model_info, count(generate, "num_requests"))


def test_capacity_search_reports_a_user_count(locust: Any, appliance: ServerProcess, tmp_path: Path) -> None:
    """``--tags capacity`` selects the scenario (and its shape) from the whole directory."""
    steps = "--capacity-start-users 1 --capacity-step-users 1 --capacity-max-users 3"
    timing = "--capacity-step-time 3 --capacity-settle-time 0.5"
    # A generous p95 limit: this test checks the search, not this machine's speed.
    # Small batches, so that every judged window sees many answers even on a busy machine.
    shapes = ["--batch-size", "1", "--seq-len", "fixed:16", "--draft-vocab", str(DRAFT_VOCAB)]
    args = ["-f", "loadtest/", "--tags", "capacity", "-t", "60s", *shapes, *f"{steps} {timing}".split()]
    args += ["--max-p95-ms", "60000"]
    run = locust.run(args, appliance.url, tmp_path / "capacity")
    assert_ok(run)
    capacity = run.report()["capacity"]
    assert capacity["capacity_users"] == 3
    assert [step["users"] for step in capacity["steps"]] == [1, 2, 3]
    assert all(step["passed"] and step["requests"] > 0 for step in capacity["steps"])
    assert capacity["stopped_because"] == "reached max users (3)"
    assert "capacity: 3 users" in run.output
    plot = tmp_path / "capacity_capacity.png"  # beside Locust's CSV files
    assert capacity["plot"] == str(plot) and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert all(step["answers_per_second"] > 0 and step["p50_ms"] <= step["p99_ms"] for step in capacity["steps"])
    assert count(run.stats()[("POST", "generate")], "num_failures") == 0


def test_fault_mix_leaves_the_ranks_unharmed(locust: Any, appliance: ServerProcess, tmp_path: Path) -> None:
    slow = ["--slow-read-batch", "4", "--slow-read-rate", "262144", "--slow-read-max-time", "2"]
    args = ["-f", "loadtest/faults.py", "-u", "8", "-r", "8", "-t", "8s", *SHAPES, *slow]
    run = locust.run(args, appliance.url, tmp_path / "faults")
    assert_ok(run)
    stats = run.stats()
    assert FAULT_ROWS <= set(stats)
    for key in FAULT_ROWS | {("POST", "generate")}:
        assert count(stats[key], "num_requests") > 0, key
        assert count(stats[key], "num_failures") == 0, (key, run.report()["errors"])
    report = run.report()
    assert report["scenario"] == "faults" and report["verdict"]["passed"]


def test_a_fleet_rank_trains_through_a_server_killed_and_restarted(
    locust: Any, appliance: ServerProcess, tmp_path: Path
) -> None:
    """The faults scenario's kill and restart: a rank on ``[--host, spare]`` keeps training; the spare is used again."""
    from eagle3_appliance.model.builtin_model import ensure_builtin_model

    cache = tmp_path / "cache"
    ensure_builtin_model(cache)  # the same seeded model as --host's, made before the clock starts
    spare = f"{{python}} -m eagle3_appliance serve --host 127.0.0.1 --port {{port}} --cache-dir {cache}"
    # The fleet rank and one rank on --host, pausing between steps: on two busy cores, ranks
    # hammering --host would triple the spare's start-up (the fault mix itself is the test above).
    # The run ends once the sequence is done; -t is only the bound.
    classes = ["ServerKillRestart", "FaultMixRank"]
    args = ["-f", "loadtest/faults.py", *classes, "-u", "2", "-r", "2", "-t", "90s", "--think-time", "0.5", *SHAPES]
    args += ["--kill-restart", "1", "--kill-interval", "2", "--spare-server-cmd", spare, "--spare-start-timeout", "30"]
    args += ["--stop-after-kill-restart"]
    run = locust.run(args, appliance.url, tmp_path / "kill")
    assert_ok(run)
    stats = run.stats()
    for key in [("POST", "generate"), ("FLEET", "fleet: generate")]:
        assert count(stats[key], "num_requests") > 3, key
        assert count(stats[key], "num_failures") == 0, (key, run.report()["errors"])
    for name in ("fault: spare server start", "fault: server killed", "fault: server restarted"):
        row = stats[("FLEET", name)]
        assert (count(row, "num_requests"), count(row, "num_failures")) == (1, 0), row
    assert run.report()["verdict"]["passed"]
    # The spare this Locust process started ends with it (its command line names this test's cache).
    left = [cmd for cmd in _command_lines() if str(cache) in cmd]
    assert not left, left


def _command_lines() -> list[str]:
    lines = []
    for proc in Path("/proc").iterdir():
        try:
            lines.append((proc / "cmdline").read_bytes().replace(b"\0", b" ").decode())
        except OSError:  # not a process, or it ended meanwhile
            continue
    return lines


@pytest.mark.parametrize(
    ("mode", "message"), [("probs", "target_probs rows do not sum to 1"), ("shapes", "target_probs has shape")]
)
def test_steady_fails_against_a_broken_server(
    locust: Any, broken_server: str, mode: str, message: str, tmp_path: Path
) -> None:
    args = ["-f", "loadtest/steady.py", "-u", "2", "-r", "2", "-t", "3s", *SHAPES]
    run = locust.run(args, f"{broken_server}/{mode}", tmp_path / mode)
    assert run.returncode == 1, run.output[-4000:]
    generate = run.stats()[("POST", "generate")]
    assert count(generate, "num_requests") > 0
    assert count(generate, "num_failures") == count(generate, "num_requests")
    report = run.report()
    errors = [e["error"] for e in report["errors"] if e["name"] == "generate"]
    assert errors and all(message in e for e in errors), errors
    assert not report["verdict"]["passed"]
    assert report["custom_metrics"]["invalid"] == count(generate, "num_failures")


def test_steady_passes_against_the_fake_server_when_nothing_is_broken(
    locust: Any, broken_server: str, tmp_path: Path
) -> None:
    """The control for the test above: the fake server's answers are right unless a mode breaks them."""
    run = locust.run(
        ["-f", "loadtest/steady.py", "-u", "2", "-r", "2", "-t", "3s", *SHAPES], f"{broken_server}/ok", tmp_path / "c"
    )
    assert_ok(run)
    assert count(run.stats()[("POST", "generate")], "num_failures") == 0


def test_bad_options_stop_the_run_before_it_starts(locust: Any, tmp_path: Path) -> None:
    run = locust.run(["-f", "loadtest/", "--seq-len", "zipf:2", "-t", "5s"], "http://127.0.0.1:9", tmp_path / "bad")
    assert run.returncode == 2
    assert "unknown length distribution 'zipf'" in run.output


def test_an_encoding_the_server_does_not_offer_stops_the_users(
    locust: Any, appliance: ServerProcess, tmp_path: Path
) -> None:
    args = ["-f", "loadtest/steady.py", "-u", "1", "-r", "1", "-t", "3s", *SHAPES, "--encoding", "no-such-encoding"]
    run = locust.run(args, appliance.url, tmp_path / "encoding")
    assert run.returncode == 1, run.output[-4000:]
    assert "--encoding no-such-encoding" in run.output and "this user stops" in run.output
    stats = run.stats()
    assert count(stats[("POST", "session")], "num_failures") == 1
    assert ("POST", "generate") not in stats


def test_this_session_never_imports_locust() -> None:
    """Locust runs only as subprocesses: importing it here would monkey-patch this interpreter."""
    assert "locust" not in sys.modules and "gevent" not in sys.modules


def test_steady_with_dflash_style_requests(
    locust: Any, appliance: ServerProcess, model_info: dict[str, Any], tmp_path: Path
) -> None:
    """``--capture dflash+logits:...``: sessions ask for the layers and logits, every answer is checked."""
    capture = ["--capture", "dflash+logits:0,2,4,6,7"]
    run = locust.run(
        ["-f", "loadtest/steady.py", "-u", "2", "-r", "2", "-t", "5s", *SHAPES, *capture],
        appliance.url,
        tmp_path / "dflash",
    )
    assert_ok(run)
    stats = run.stats()
    generate = stats[("POST", "generate")]
    assert count(generate, "num_requests") > 0 and count(generate, "num_failures") == 0
    assert ("POST", "set_vocab_mapping") not in stats  # a DFlash capture needs no draft vocabulary
    m = run.report()["custom_metrics"]
    assert m["invalid"] == 0
    # fp32 hidden states of 5 layers [T,5H] and fp32 logits [T,V], per token.
    assert m["supervision_bytes_per_token"] == 5 * model_info["hidden_size"] * 4 + model_info["vocab_size"] * 4
    metrics = Path(run.report()["server_metrics"]["file"]).read_text()
    assert 'eagle3_generate_captures_total{capture="dflash+logits"}' in metrics


def test_steady_with_eagle_requests(
    locust: Any, appliance: ServerProcess, model_info: dict[str, Any], tmp_path: Path
) -> None:
    """``--capture eagle`` (EAGLE-1/2): the last hidden state and the logits of every answer checked, counted."""
    run = locust.run(
        ["-f", "loadtest/steady.py", "-u", "1", "-r", "1", "-t", "4s", *SHAPES, "--capture", "eagle"],
        appliance.url,
        tmp_path / "eagle",
    )
    assert_ok(run)
    stats = run.stats()
    generate = stats[("POST", "generate")]
    assert count(generate, "num_requests") > 0 and count(generate, "num_failures") == 0
    assert ("POST", "set_vocab_mapping") not in stats
    m = run.report()["custom_metrics"]
    assert m["invalid"] == 0
    # fp32 last hidden state [T,H] and fp32 logits [T,V], per token.
    assert m["supervision_bytes_per_token"] == model_info["hidden_size"] * 4 + model_info["vocab_size"] * 4
    metrics = Path(run.report()["server_metrics"]["file"]).read_text()
    assert 'eagle3_generate_captures_total{capture="eagle"}' in metrics


def test_steady_with_packed_rows(
    locust: Any, appliance: ServerProcess, model_info: dict[str, Any], tmp_path: Path
) -> None:
    """``--packed-sequence-size``: packed rows (a session granted packing), every answer checked, no padding."""
    args = ["-f", "loadtest/steady.py", "-u", "2", "-r", "2", "-t", "5s", *SHAPES, "--packed-sequence-size", "96"]
    run = locust.run(args, appliance.url, tmp_path / "packed")
    assert_ok(run)
    stats = run.stats()
    assert count(stats[("POST", "generate")], "num_requests") > 0
    assert all(count(row, "num_failures") == 0 for row in stats.values())
    m = run.report()["custom_metrics"]
    assert m["invalid"] == 0 and m["responses"] > 0
    # Two rows of 96 per request; only the tail of each row after its last sample is padding.
    assert m["tokens"] == m["responses"] * 2 * 96
    assert m["real_tokens"] > 0.5 * m["tokens"]


@pytest.fixture(scope="module")
def vlm_appliance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """An appliance on a tiny Qwen2-VL (random weights, built from a config)."""
    from tests.vlm_support import APPLIANCE_ARGS, make_tiny_vlm

    folder = make_tiny_vlm(tmp_path_factory.mktemp("vlm") / "model")
    log = tmp_path_factory.mktemp("vlm-logs") / "server.log"
    with ServerProcess(["--model", str(folder), *APPLIANCE_ARGS], log_path=log) as server:
        yield server


@pytest.mark.parametrize("kind", ["vispec", "msd"])
def test_steady_with_vision_language_captures(
    locust: Any, vlm_appliance: ServerProcess, kind: str, tmp_path: Path
) -> None:
    """``--capture vispec`` / ``msd`` against a vision-language appliance: every answer's three
    tensors checked (embeddings and last hidden state [B,T,H], logits [B,T,V]), counted by kind."""
    info = httpx.post(vlm_appliance.url + "/model_info", trust_env=False).json()
    shapes = ["--batch-size", "2", "--seq-len", "uniform:8:32", "--max-seq-len", "32", "--draft-vocab", "64"]
    run = locust.run(
        ["-f", "loadtest/steady.py", "-u", "1", "-r", "1", "-t", "4s", *shapes, "--capture", kind],
        vlm_appliance.url,
        tmp_path / kind,
    )
    assert_ok(run)
    generate = run.stats()[("POST", "generate")]
    assert count(generate, "num_requests") > 0 and count(generate, "num_failures") == 0
    m = run.report()["custom_metrics"]
    assert m["invalid"] == 0
    # fp32 embeddings and last hidden state [T,2H] and fp32 logits [T,V], per token.
    assert m["supervision_bytes_per_token"] == 2 * info["hidden_size"] * 4 + info["vocab_size"] * 4
    metrics = Path(run.report()["server_metrics"]["file"]).read_text()
    assert f'eagle3_generate_captures_total{{capture="{kind}"}}' in metrics
