"""A ``/generate`` past the server's own request time limit (``--request-timeout``: 503), one real server.

The policy (issue #33, item 4): such a 503 says the server is alive and computing, not that it
failed, so the client neither takes the server out nor registers a new session (whose requests
could never join the computation). It sends the request again at most ``max_retries`` times
under the same request id, each attempt joined to the one forward, then raises it.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from eagle3_client import RemoteEagle3TargetModel, TargetHTTPError, protocol
from tests.ops_support import batch, make_slow_model, metric, model_env, scrape, server, vocab_mapping_body, wait_until

FORWARDS = "eagle3_inference_exec_count_total"
SESSIONS = "eagle3_sessions_registered_total"
FAILURES = "eagle3_request_failure_total"
# The slow forward takes 10 s; the server gives each attempt 1 s, so three attempts back to back
# end long before it. failover_timeout bounds the old behaviour (a new session and a new forward
# per attempt until it ran out).
SLOW_S = 10.0
LIMIT_S = 1.0
OPTIONS = {"backoff": 0.0, "failover_timeout": 8.0, "probe_interval": 0.2, "probe_max_interval": 0.5}


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("time-limit")
    args = ["--model", str(make_slow_model(tmp / "model", SLOW_S)), "--trust-remote-code"]
    with server([*args, "--request-timeout", str(LIMIT_S)], model_env(), tmp / "server.log") as proc:
        yield proc.url


def _settled(url: str) -> bool:
    s = scrape(url)
    return metric(s, "eagle3_inflight_requests") == 0 and metric(s, "eagle3_inference_computing") == 0


@pytest.mark.parametrize("max_retries", [0, 2])
def test_a_request_past_the_time_limit_is_raised_after_max_retries_joined_attempts_and_one_forward(
    url: str, max_retries: int
) -> None:
    slow = batch(1, 16, slow=True, seed=40 + max_retries)
    wait_until(lambda: _settled(url), timeout=60, what="an earlier forward to end")
    before = scrape(url)
    with RemoteEagle3TargetModel.from_urls([url], max_retries=max_retries, **OPTIONS) as remote:
        ids = torch.arange(0, 1024, 4)
        mask = torch.zeros(1024, dtype=torch.bool)
        mask[ids] = True
        remote.set_vocab_mapping(ids, mask)
        with pytest.raises(TargetHTTPError) as raised:
            remote.generate_batch(slow["input_ids"], slow["attention_mask"], slow["loss_mask"])
        assert raised.value.status == 503 and "time limit" in str(raised.value)
        assert type(raised.value).__name__ == "TargetTimeLimit"
        # The server was not declared failed: same session, still in the rotation.
        (entry,) = remote.transport_stats()
        assert entry["state"] == "ready" and entry["failovers"] == 0 and entry["readmissions"] == 0, entry
    wait_until(lambda: _settled(url), timeout=60, what="the slow forward to end")
    after = scrape(url)
    assert metric(after, SESSIONS) - metric(before, SESSIONS) == 1
    assert metric(after, FORWARDS) - metric(before, FORWARDS) == 1  # every attempt joined the one forward
    refused = metric(after, FAILURES, endpoint="generate", status="503") - metric(
        before, FAILURES, endpoint="generate", status="503"
    )
    assert refused == 1 + max_retries


def test_the_time_limit_503_names_itself_and_stays_a_plain_503_for_upstream(url: str) -> None:
    """An upstream client sees a 503 with Retry-After; ours also reads the time limit in a header."""
    import httpx

    from eagle3_client import wire

    slow = batch(1, 16, slow=True, seed=77)
    wait_until(lambda: _settled(url), timeout=60, what="an earlier forward to end")
    with httpx.Client(timeout=60) as client:
        assert client.post(f"{url}/set_vocab_mapping", content=vocab_mapping_body()).status_code == 200
        resp = client.post(f"{url}/generate", content=wire.encode(slow))
    assert resp.status_code == 503 and "Retry-After" in resp.headers
    assert float(resp.headers[protocol.TIME_LIMIT_HEADER]) == LIMIT_S
    assert "time limit" in resp.json()["error"]
    wait_until(lambda: _settled(url), timeout=60, what="the slow forward to end")
