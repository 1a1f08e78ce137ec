"""Overload with impatient clients: no forward for a client that left, one forward per request id.

A real appliance on a slow model (its forward sleeps on a marker token). Clients that give up
are raw sockets closed at a moment the test picks (once the server shows the request queued or
computing), so the outcome does not depend on the machine's speed. Bodies are larger than
64 KiB: above that, Sanic stops reading the socket and used to miss the client's departure.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from eagle3_client import RemoteEagle3TargetModel, protocol, wire
from tests.ops_support import (
    batch,
    in_background,
    metric,
    model_env,
    post,
    scrape,
    server,
    vocab_mapping_body,
    wait_until,
)

ABANDONED = "eagle3_generate_abandoned_total"
GONE = {"reason": "client_gone"}
FORWARDS = "eagle3_inference_exec_count_total"


def _start(slow_model: Path, tmp: Path, extra: list[str]) -> Iterator[str]:
    args = ["--model", str(slow_model), "--trust-remote-code", *extra]
    with server(args, model_env(), tmp / "server.log") as proc:
        assert post(proc.url, "set_vocab_mapping", vocab_mapping_body()).status_code == 200
        yield proc.url


@pytest.fixture(scope="module", params=["alone", "microbatch"])
def url(request: pytest.FixtureRequest, slow_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    extra = ["--microbatch-wait-ms", "5"] if request.param == "microbatch" else []
    yield from _start(slow_model, tmp_path_factory.mktemp(request.param), extra)


def _large_body(*, slow: bool = False, seed: int = 0) -> bytes:
    body = wire.encode(batch(2, 2048, slow=slow, seed=seed))
    assert len(body) > 64 * 1024  # beyond Sanic's read buffer: the case that used to be missed
    return body


def _open_request(url: str, body: bytes, headers: dict[str, str] | None = None) -> socket.socket:
    """A POST /generate sent in full on a raw socket whose answer is never read."""
    parsed = httpx.URL(url)
    sock = socket.create_connection((parsed.host, parsed.port), timeout=10)
    lines = [
        "POST /generate HTTP/1.1",
        f"Host: {parsed.host}:{parsed.port}",
        "Content-Type: application/octet-stream",
        f"Content-Length: {len(body)}",
        *(f"{k}: {v}" for k, v in (headers or {}).items()),
    ]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
    return sock


def _gauge(url: str, name: str) -> float:
    return metric(scrape(url), name)


def _settled(url: str) -> bool:
    s = scrape(url)
    return metric(s, "eagle3_inflight_requests") == 0 and metric(s, "eagle3_inference_computing") == 0


def _slow_request(url: str) -> httpx.Response:
    return post(url, "generate", wire.encode(batch(1, 16, slow=True)))


def _open_queued(url: str, body: bytes, headers: dict[str, str]) -> socket.socket:
    """Send ``body`` while a slow forward runs, once it is queued behind it; its open connection."""
    wait_until(lambda: _gauge(url, "eagle3_inference_computing") == 1, what="the slow forward")
    first = _open_request(url, body, headers)
    wait_until(lambda: _gauge(url, "eagle3_inference_pending_request_count") == 1, what="the request queued")
    return first


def _assert_fresh_answer(url: str, body: bytes, retry: httpx.Response) -> None:
    """``retry``'s answer is, bit for bit, the one a fresh request for ``body`` gets."""
    fresh = post(url, "generate", body)
    assert fresh.status_code == 200
    got, want = wire.decode(retry.content), wire.decode(fresh.content)
    assert list(got) == list(want)
    for key, tensor in want.items():
        assert tensor is not None and torch.equal(got[key], tensor), key


def test_a_queued_request_whose_client_left_is_not_computed(url: str) -> None:
    before = scrape(url)
    with in_background(lambda: _slow_request(url)) as slow:
        wait_until(lambda: _gauge(url, "eagle3_inference_computing") == 1, what="the slow forward")
        gone = _open_request(url, _large_body())
        wait_until(lambda: _gauge(url, "eagle3_inference_pending_request_count") == 1, what="the request queued")
        gone.close()  # the client times out and leaves while its request waits for the model
    assert slow["result"].status_code == 200
    wait_until(lambda: _settled(url), what="the server to settle")
    after = scrape(url)
    assert metric(after, FORWARDS) - metric(before, FORWARDS) == 1  # the slow one only
    assert metric(after, ABANDONED, **GONE) - metric(before, ABANDONED, **GONE) == 1


def test_a_retry_of_a_request_id_that_is_computing_attaches_to_it(url: str) -> None:
    body = _large_body(slow=True, seed=5)
    headers = {protocol.REQUEST_ID_HEADER: "retry-computing-1"}
    before = scrape(url)
    first = _open_request(url, body, headers)
    wait_until(lambda: _gauge(url, "eagle3_inference_computing") == 1, what="the first attempt's forward")
    first.close()  # gave up during the forward
    retry = post(url, "generate", body, headers)
    assert retry.status_code == 200, retry.text
    wait_until(lambda: _settled(url), what="the server to settle")
    after = scrape(url)
    assert metric(after, FORWARDS) - metric(before, FORWARDS) == 1
    _assert_fresh_answer(url, body, retry)  # the attached answer is the one a fresh request gets


def test_a_retry_after_the_forward_finished_unseen_gets_the_kept_answer(url: str) -> None:
    body = _large_body(slow=True, seed=11)
    headers = {protocol.REQUEST_ID_HEADER: "retry-finished-1"}
    before = scrape(url)
    first = _open_request(url, body, headers)
    wait_until(lambda: _gauge(url, "eagle3_inference_computing") == 1, what="the first attempt's forward")
    first.close()
    wait_until(lambda: _settled(url), what="the forward to finish with nobody waiting")
    retry = post(url, "generate", body, headers)
    assert retry.status_code == 200, retry.text
    assert metric(scrape(url), FORWARDS) - metric(before, FORWARDS) == 1


def test_a_retry_of_a_queued_request_id_runs_one_forward(url: str) -> None:
    body = _large_body(seed=6)
    headers = {protocol.REQUEST_ID_HEADER: "retry-queued-1"}
    before = scrape(url)
    with in_background(lambda: _slow_request(url)) as slow:
        first = _open_queued(url, body, headers)
        with in_background(lambda: post(url, "generate", body, headers)) as retry:
            first.close()
    assert slow["result"].status_code == 200
    assert retry["result"].status_code == 200
    wait_until(lambda: _settled(url), what="the server to settle")
    assert metric(scrape(url), FORWARDS) - metric(before, FORWARDS) == 2  # the slow one and one for the id


def test_a_retry_after_its_queued_job_had_its_turn_computes_nothing_again(url: str) -> None:
    # The gap widened: the first attempt leaves while its job is queued, and the job's turn comes
    # (the slow forward ends) before the retry arrives. The job still runs, and the retry takes its answer.
    body = _large_body(seed=12)
    headers = {protocol.REQUEST_ID_HEADER: "retry-after-turn-1"}
    before = scrape(url)
    with in_background(lambda: _slow_request(url)) as slow:
        first = _open_queued(url, body, headers)
        first.close()  # the attempt timed out; its retry is late
    assert slow["result"].status_code == 200

    def turn_passed() -> bool:  # the queued job was either computed or dropped at its turn
        s = scrape(url)
        done = metric(s, FORWARDS) - metric(before, FORWARDS) == 2
        dropped = metric(s, ABANDONED, **GONE) - metric(before, ABANDONED, **GONE) == 1
        return (done or dropped) and _settled(url)

    wait_until(turn_passed, what="the queued job's turn")
    between = scrape(url)
    retry = post(url, "generate", body, headers)
    assert retry.status_code == 200, retry.text
    wait_until(lambda: _settled(url), what="the server to settle")
    after = scrape(url)
    assert metric(after, FORWARDS) - metric(between, FORWARDS) == 0  # the retry computed nothing again
    assert metric(after, FORWARDS) - metric(before, FORWARDS) == 2  # the slow one and one for the id
    assert metric(after, ABANDONED, **GONE) == metric(before, ABANDONED, **GONE)
    _assert_fresh_answer(url, body, retry)


def test_a_reused_request_id_with_another_body_is_computed_on_its_own(url: str) -> None:
    headers = {protocol.REQUEST_ID_HEADER: "reused-id"}
    a, b = _large_body(slow=True, seed=7), _large_body(seed=8)
    with in_background(lambda: post(url, "generate", a, headers)) as first:
        wait_until(lambda: _gauge(url, "eagle3_inference_computing") == 1, what="the first forward")
        second = post(url, "generate", b, headers)
    assert first["result"].status_code == 200 and second.status_code == 200
    fresh = post(url, "generate", b)
    assert torch.equal(wire.decode(second.content)["target_probs"], wire.decode(fresh.content)["target_probs"])


def test_our_client_retrying_after_timeouts_costs_one_forward(url: str) -> None:
    # A deliberately short wait: every attempt times out during the forward and the next attaches.
    # On the wire plane: a process-group /generate is never blindly retried (it recovers by resend).
    options = {"data_plane": "wire", "generate_timeout": 1.0, "max_retries": 8, "backoff": 0}
    _client_generates_once(url, batch(1, 16, slow=True, seed=9), options)


def test_our_client_waits_in_the_queue_past_its_read_timeout(url: str) -> None:
    # timeout=1 s is shorter than the forward: the client waits for /generate up to the server's
    # own --request-timeout instead, so it neither gives up nor re-queues.
    _client_generates_once(url, batch(1, 16, slow=True, seed=10), {"timeout": 1.0, "max_retries": 0})


def _client_generates_once(url: str, inputs: dict[str, torch.Tensor], options: dict[str, Any]) -> None:
    """Our client with ``options`` gets one slow batch's answer, and the server ran one forward for it."""
    before = scrape(url)
    with RemoteEagle3TargetModel.from_urls([url], **options) as remote:
        ids = torch.arange(0, 1024, 4)
        mask = torch.zeros(1024, dtype=torch.bool)
        mask[ids] = True
        remote.set_vocab_mapping(ids, mask)
        result = remote.generate_batch(inputs["input_ids"], inputs["attention_mask"], inputs["loss_mask"])
    assert result.target_probs.shape == (1, 16, 256)
    wait_until(lambda: _settled(url), what="the server to settle")
    assert metric(scrape(url), FORWARDS) - metric(before, FORWARDS) == 1
