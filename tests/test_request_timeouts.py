"""A ``/generate`` that outlasts the client's ``generate_timeout``, against one real server.

The policy: a request that timed out is sent again at most ``max_retries`` times, each attempt
joined to the first by its request id (one forward), and then raised as ``TargetTimeout``; the
server stays in the rotation with its session, because a slow request is not a dead server.
The server counts each attempt whose client hung up as ``aborted``, not as a server error.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import httpx
import pytest
import torch

from eagle3_client import NoServerReady, RemoteEagle3TargetModel, TargetTimeout, wire
from tests.ops_support import (
    batch,
    make_slow_model,
    metric,
    model_env,
    post,
    scrape,
    server,
    vocab_mapping_body,
    wait_until,
)

FORWARDS = "eagle3_inference_exec_count_total"
SESSIONS = "eagle3_sessions_registered_total"
FAILURES = "eagle3_request_failure_total"
# The slow forward takes 6 s; every attempt gives up after 2.5 s (a fast forward needs far less,
# even on a busy machine). failover_timeout bounds the old behaviour (looping until it ran out).
SLOW_S = 6.0
OPTIONS = {"generate_timeout": 2.5, "backoff": 0.0, "failover_timeout": 8.0}


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("timeouts")
    args = ["--model", str(make_slow_model(tmp / "model", SLOW_S)), "--trust-remote-code"]
    with server(args, model_env(), tmp / "server.log") as proc:
        assert post(proc.url, "set_vocab_mapping", vocab_mapping_body()).status_code == 200
        yield proc.url


def _settled(url: str) -> bool:
    s = scrape(url)
    return metric(s, "eagle3_inflight_requests") == 0 and metric(s, "eagle3_inference_computing") == 0


def _remote(url: str, data_plane: str, max_retries: int) -> RemoteEagle3TargetModel:
    remote = RemoteEagle3TargetModel.from_urls([url], data_plane=data_plane, max_retries=max_retries, **OPTIONS)
    ids = torch.arange(0, 1024, 4)
    mask = torch.zeros(1024, dtype=torch.bool)
    mask[ids] = True
    remote.set_vocab_mapping(ids, mask)
    return remote


@pytest.mark.parametrize(
    ("data_plane", "max_retries", "attempts"),
    [
        ("wire", 0, 1),
        ("wire", 1, 2),  # the retry joins the first attempt's computation by request id
        ("gloo", 1, 1),  # a group transfer cannot be joined: not sent again (not over the wire either)
    ],
)
def test_a_timed_out_request_is_retried_max_retries_times_then_raised_with_one_forward(
    url: str, data_plane: str, max_retries: int, attempts: int
) -> None:
    slow = batch(1, 16, slow=True, seed=20 + attempts)
    fast = batch(1, 16, seed=30 + attempts)
    before = scrape(url)
    with _remote(url, data_plane, max_retries) as remote:
        with pytest.raises(TargetTimeout) as raised:
            remote.generate_batch(slow["input_ids"], slow["attention_mask"], slow["loss_mask"])
        assert not isinstance(raised.value, NoServerReady)
        assert f"after {attempts} attempt(s)" in str(raised.value)
        # The server was not declared dead: same session, still in the rotation, still serving.
        (entry,) = remote.transport_stats()
        assert entry["state"] == "ready" and entry["failovers"] == 0 and entry["readmissions"] == 0
        assert (entry["tier"], entry["fallbacks"]) == (data_plane, 0)  # a group is kept too
        wait_until(lambda: _settled(url), what="the slow forward to end")  # the next batch does not queue behind it
        answer = remote.generate_batch(fast["input_ids"], fast["attention_mask"], fast["loss_mask"])
        assert answer.target_probs.shape == (1, 16, 256)
    wait_until(lambda: _settled(url), what="the server to settle")
    after = scrape(url)
    assert metric(after, SESSIONS) - metric(before, SESSIONS) == 1
    assert metric(after, FORWARDS) - metric(before, FORWARDS) == 2  # the slow batch once, the fast one
    # Every attempt of the slow batch was abandoned by its client: 'aborted', never a 5xx.
    generate_failures = {
        dict(labels)["status"]: value - before.get((name, labels), 0.0)
        for (name, labels), value in after.items()
        if name == FAILURES and dict(labels).get("endpoint") == "generate"
    }
    assert {status: n for status, n in generate_failures.items() if n} == {"aborted": attempts}


def test_a_client_that_hangs_up_mid_generate_is_counted_aborted_not_as_a_server_error(url: str) -> None:
    body = wire.encode(batch(1, 16, slow=True, seed=40))
    before = scrape(url)
    parsed = httpx.URL(url)
    with socket.create_connection((parsed.host, parsed.port), timeout=10) as sock:
        head = f"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\nContent-Length: {len(body)}\r\n\r\n"
        sock.sendall(head.encode() + body)
        wait_until(lambda: metric(scrape(url), "eagle3_inference_computing") == 1, what="the forward")
    wait_until(lambda: _settled(url), what="the server to settle")
    after = scrape(url)

    def failures(status: str) -> float:
        return metric(after, FAILURES, endpoint="generate", status=status) - metric(
            before, FAILURES, endpoint="generate", status=status
        )

    assert failures("aborted") == 1
    assert failures("500") == 0
