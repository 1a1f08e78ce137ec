"""What only the appliance-hosted queue has: the run bound, the metrics, the HTTP error bodies, auth.

The queue semantics themselves are tests/test_stream_queue_contract.py's (both backends).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from eagle3_appliance.errors import InvalidRequest
from eagle3_appliance.launch import ServerProcess
from eagle3_appliance.stream.queue import MAX_RUNS, QueueHostFull, QueueObserver, RunQueues, UnknownRun
from eagle3_client.protocol import MAX_STREAM_IDS_PER_REQUEST, RunDescription, StreamRef, queue_path
from eagle3_client.streaming.appliance_queue import ApplianceQueue
from eagle3_client.streaming.queues import StreamError
from tests.ops_support import metric, scrape

DESCRIPTION = RunDescription("eagle3", "eagle3", "topk:4", "model-a", visibility_timeout_s=10.0)
TOKEN = "queue-token-for-tests"


def ref(run_id: str, sample_id: str, store: str = "appliance://10.0.0.1:8001", model: str = "model-a") -> StreamRef:
    return StreamRef(sample_id, run_id, store, {}, {}, "eagle3", 1, 4, 0, model)


class Recorder(QueueObserver):
    def __init__(self) -> None:
        self.counts_seen: dict[str, tuple[int, int, int]] = {}
        self.events: list[tuple[str, str]] = []
        self.ended_runs: list[str] = []

    def counts(self, run_id: str, pending: int, leased: int, acked: int) -> None:
        self.counts_seen[run_id] = (pending, leased, acked)

    def event(self, run_id: str, event: str) -> None:
        self.events.append((run_id, event))

    def ended(self, run_id: str) -> None:
        self.ended_runs.append(run_id)


def test_the_host_holds_at_most_max_runs_until_one_ends() -> None:
    queues = RunQueues()
    for i in range(MAX_RUNS):
        queues.open(f"r{i}", DESCRIPTION)
    with pytest.raises(QueueHostFull, match=f"already hosts {MAX_RUNS} run queues") as refused:
        queues.open("one-more", DESCRIPTION)
    assert refused.value.status_code == 409
    queues.open("r0", None)  # an existing run still opens
    queues.end("r0")
    queues.open("one-more", DESCRIPTION)
    assert len(queues.runs()) == MAX_RUNS


def test_every_change_reaches_the_observer() -> None:
    now = [100.0]
    recorder = Recorder()
    queues = RunQueues(recorder, clock=lambda: now[0])
    queues.open("r", DESCRIPTION)
    assert recorder.counts_seen["r"] == (0, 0, 0)
    queues.put("r", ref("r", "s1"))
    queues.put("r", ref("r", "s2"))
    with pytest.raises(Exception, match="model-b"):
        queues.put("r", ref("r", "s3", model="model-b"))
    queues.put("r", ref("r", "s1", store="appliance://10.0.0.2:8001"))
    first, _ = queues.acquire("r", "t0")
    second, _ = queues.acquire("r", "t0")
    assert first is not None and second is not None
    assert recorder.counts_seen["r"] == (0, 2, 0)
    assert queues.acquire("r", "t0") == (None, False)
    queues.fail("r", "s1", first.lease_id)
    now[0] += DESCRIPTION.visibility_timeout_s  # s2's lease runs out
    assert queues.reclaim("r") == 1
    assert recorder.counts_seen["r"] == (2, 0, 0)
    assert [e for _, e in recorder.events] == ["refused", "recomputed", "empty", "redelivered", "redelivered"]
    queues.end("r")
    assert recorder.ended_runs == ["r"]
    with pytest.raises(UnknownRun):
        queues.state("r")


def test_a_page_is_bounded() -> None:
    queues = RunQueues()
    queues.open("r", DESCRIPTION)
    for limit in (0, MAX_STREAM_IDS_PER_REQUEST + 1):
        with pytest.raises(InvalidRequest, match="limit"):
            queues.samples("r", None, limit)


def _post(
    server: ServerProcess, run_id: str, op: str, body: Any = None, content: bytes | None = None
) -> httpx.Response:
    url = f"{server.url}/{queue_path(run_id, op)}" if run_id != "bad id" else f"{server.url}/queue/bad%20id/{op}"
    return httpx.post(url, json=body, content=content, trust_env=False, timeout=30)


def test_refusals_answer_json_that_says_what_is_wrong(server: ServerProcess) -> None:
    unknown = _post(server, "never-opened", "acquire", {"consumer": "t0"})
    assert unknown.status_code == 404
    assert unknown.json() == {
        "error": "run 'never-opened' is not on this appliance's queue host; a producer creates it with open",
        "type": "UnknownRun",
        "status": 404,
    }
    assert _post(server, "http-r1", "open", {"description": DESCRIPTION.to_json()}).status_code == 200
    cases = [
        ("open", {"description": {"algorithm": "eagle3"}}, None, 422, "missing 'capture'"),
        ("put", {}, None, 422, "a sample reference must be a JSON object"),
        ("put", {"ref": {**ref("http-r1", "s1").to_json(), "num_tokens": -1}}, None, 422, "'num_tokens' must be >= 0"),
        ("acquire", {}, None, 422, "'consumer'"),
        ("acquire", {"consumer": "x" * 500}, None, 422, "'consumer' must be 1 to 128"),
        ("ack", {"sample_id": "s1", "lease_id": "a b"}, None, 422, "'lease_id'"),
        ("fail", {"sample_id": "s1"}, None, 422, "'lease_id'"),
        ("seal", {"total": "3"}, None, 422, "'total' must be an integer >= 0"),
        ("seal", {}, None, 422, "'total' must be an integer >= 0"),
        ("samples", {"limit": MAX_STREAM_IDS_PER_REQUEST + 1}, None, 422, "'limit' must be in [1, 10000]"),
        ("samples", {"after": ["x"]}, None, 422, "'after'"),
        ("state", None, b"not json", 400, "body is not valid JSON"),
        ("state", None, b"[1]", 400, "expected a JSON object"),
        ("ack", {"sample_id": "nope", "lease_id": "abc"}, None, 404, "run 'http-r1' has no sample 'nope'"),
    ]
    for op, body, content, status, message in cases:
        answer = _post(server, "http-r1", op, body, content)
        assert answer.status_code == status, (op, body, answer.text)
        assert message in answer.json()["error"], (op, body, answer.text)
    bad_run = _post(server, "bad id", "state", {})
    assert bad_run.status_code == 422 and "the run id must be" in bad_run.json()["error"]
    mismatch = _post(server, "http-r1", "put", {"ref": ref("http-r1", "s1", model="model-b").to_json()})
    assert mismatch.status_code == 409 and mismatch.json()["type"] == "RunMismatch"
    assert _post(server, "http-r1", "end", {}).json() == {"status": "ok"}


def test_the_queue_metrics_follow_each_hosted_run(server: ServerProcess) -> None:
    queue = ApplianceQueue("appliance://" + server.url.removeprefix("http://"), "metrics-r1")
    queue.open(DESCRIPTION)
    for sample_id in ("s1", "s2", "s3"):
        queue.put(ref(queue.run_id, sample_id))
    lease = queue.acquire("t0")
    assert lease is not None
    queue.ack("s1", lease.lease_id)
    failed = queue.acquire("t0")
    assert failed is not None
    queue.fail(failed.ref.sample_id, failed.lease_id)
    queue.put(ref(queue.run_id, "s3", store="appliance://10.0.0.2:8001"))
    with pytest.raises(StreamError):
        queue.put(ref(queue.run_id, "s4", model="model-b"))
    samples = scrape(server.url)
    by_state = {
        s: metric(samples, "eagle3_stream_queue_samples", run="metrics-r1", state=s)
        for s in ("pending", "leased", "acked")
    }
    assert by_state == {"pending": 2.0, "leased": 0.0, "acked": 1.0}
    events = {
        e: metric(samples, "eagle3_stream_queue_events_total", run="metrics-r1", event=e)
        for e in ("redelivered", "recomputed", "refused")
    }
    assert events == {"redelivered": 1.0, "recomputed": 1.0, "refused": 1.0}
    queue.end()
    assert not [key for key in scrape(server.url) if ("run", "metrics-r1") in key[1]]
    queue.close()


@pytest.fixture(scope="module")
def token_server(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("queue-auth") / "server.log"
    args = ["--cache-dir", str(cache_dir), "--max-seq-len", "512", "--auth-token", TOKEN]
    with ServerProcess(args, log_path=log) as proc:
        yield proc


def test_queue_operations_need_the_servers_token_and_no_session(token_server: ServerProcess) -> None:
    url = "appliance://" + token_server.url.removeprefix("http://")
    anonymous = ApplianceQueue(url, "auth-r1")
    with pytest.raises(StreamError, match="HTTP 401.*bearer token"):
        anonymous.open(DESCRIPTION)
    queue = ApplianceQueue(url, "auth-r1", auth_token=TOKEN)
    assert queue.open(DESCRIPTION) == DESCRIPTION
    assert queue.put(ref("auth-r1", "s1")) == "new"
    queue.end()
    for q in (anonymous, queue):
        q.close()
