"""Graceful shutdown: SIGTERM during a request lets it finish, marks the server not ready, refuses new
work, and exits 0 within the grace period; a request that outlasts the grace period makes it exit 1."""

from __future__ import annotations

import signal
from pathlib import Path

import httpx

from eagle3_client import wire
from eagle3_client.protocol import SUPERVISION_KEYS
from tests.ops_support import batch, in_background, metric, model_env, post, scrape, server, wait_until

GRACE = 20.0


def _mapping_body() -> bytes:
    from tests.ops_support import vocab_mapping_body

    return vocab_mapping_body(draft=64)


def test_sigterm_during_a_request_finishes_it_and_exits_0(slow_model: Path, tmp_path: Path) -> None:
    args = ["--model", str(slow_model), "--trust-remote-code", "--grace-period", str(GRACE)]
    proc = server(args, model_env(), tmp_path / "server.log")
    with proc:
        assert proc.proc is not None
        assert post(proc.url, "set_vocab_mapping", _mapping_body()).status_code == 200
        with in_background(lambda: post(proc.url, "generate", wire.encode(batch(2, 8, slow=True)))) as request:
            wait_until(lambda: metric(scrape(proc.url), "eagle3_inference_computing") == 1, what="the forward")
            proc.proc.send_signal(signal.SIGTERM)
            # While it drains, the server still answers probes: not ready, reason draining.
            ready = wait_until(
                lambda: (r := httpx.get(proc.url + "/health/ready", trust_env=False)).status_code == 503 and r,
                what="readiness to turn 503",
            )
            assert ready.json()["reasons"] == ["draining: the server is shutting down"]
            assert httpx.get(proc.url + "/health/live", trust_env=False).status_code == 200
            refused = post(proc.url, "generate", wire.encode(batch(1, 4)))
            assert refused.status_code == 503 and "shutting down" in refused.json()["error"]
            assert "retry-after" in refused.headers
            assert not request["done"], "the slow request ended before the drain was observed"
        response = request["result"]
        assert response.status_code == 200
        assert list(wire.decode(response.content)) == list(SUPERVISION_KEYS)
        assert proc.proc.wait(timeout=GRACE + 15) == 0
    log = (tmp_path / "server.log").read_text()
    assert "draining: waiting up to 20 s for 1 request(s) in flight" in log
    assert "drained in" in log


def test_a_request_outlasting_the_grace_period_makes_the_exit_code_1(slow_model: Path, tmp_path: Path) -> None:
    args = ["--model", str(slow_model), "--trust-remote-code", "--grace-period", "0.5"]
    proc = server(args, model_env(), tmp_path / "server.log")
    with proc:
        assert proc.proc is not None
        assert post(proc.url, "set_vocab_mapping", _mapping_body()).status_code == 200
        with in_background(lambda: post(proc.url, "generate", wire.encode(batch(1, 8, slow=True)))) as request:
            wait_until(lambda: metric(scrape(proc.url), "eagle3_inference_computing") == 1, what="the forward")
            proc.proc.send_signal(signal.SIGTERM)
            assert proc.proc.wait(timeout=30) == 1
        assert "error" in request  # the client saw its connection cut
    assert "grace period of 0.5 s ran out with 1 request(s) still in flight" in (tmp_path / "server.log").read_text()
