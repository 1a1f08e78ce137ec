"""The queue contract (eagle3_client.streaming.queues), run against both backends on real servers.

Every test takes ``queue_backend``: an appliance process (the shared ``server`` fixture) or a
``redis-server`` started for this module (tests/redis_support.py). Each test works on runs of
its own, so the servers are shared.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace

import pytest

from eagle3_appliance.launch import ServerProcess, free_port
from eagle3_client.protocol import MAX_STREAM_IDS_PER_REQUEST, RunDescription, StreamRef
from eagle3_client.streaming.appliance_queue import ApplianceQueue
from eagle3_client.streaming.queues import (
    PUT_ACKED,
    PUT_NEW,
    PUT_REPLACED,
    LeaseNotHeld,
    QueueBackend,
    QueueUnreachable,
    RunMismatch,
    UnknownRun,
    UnknownSample,
)
from eagle3_client.streaming.redis_queue import RedisQueue
from tests.redis_support import redis_server

FINGERPRINT = "model-a"
DESCRIPTION = RunDescription("eagle3", "eagle3", "topk:4", FINGERPRINT, visibility_timeout_s=60.0)
SHORT = 0.5  # the visibility timeout of the expiry tests


def _connect(url: str, run_id: str, **options: float) -> QueueBackend:
    if url.startswith("redis://"):
        return RedisQueue(url, run_id, **options)  # type: ignore[arg-type]
    return ApplianceQueue(url, run_id, **options)  # type: ignore[arg-type]


class Queues:
    """Backends of one kind on fresh runs; every backend is closed and every run ended at teardown."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._opened: list[QueueBackend] = []

    def connect(self, run_id: str) -> QueueBackend:
        queue = _connect(self.url, run_id)
        self._opened.append(queue)
        return queue

    def new(self, description: RunDescription | None = DESCRIPTION) -> QueueBackend:
        """A backend on a run nobody used, opened with ``description`` (None: not opened)."""
        queue = self.connect(f"run-{uuid.uuid4().hex[:12]}")
        if description is not None:
            queue.open(description)
        return queue

    def close(self) -> None:
        for queue in self._opened:
            queue.end()
            queue.close()


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with redis_server(tmp_path_factory.mktemp("redis") / "redis.log") as url:
        yield url


@pytest.fixture(params=["appliance", pytest.param("redis", marks=pytest.mark.redis)])
def queue_backend(request: pytest.FixtureRequest) -> Iterator[Queues]:
    if request.param == "redis":
        url = request.getfixturevalue("redis_url")
    else:
        server: ServerProcess = request.getfixturevalue("server")
        url = "appliance://" + server.url.removeprefix("http://")
    queues = Queues(url)
    yield queues
    queues.close()


def ref(queue: QueueBackend, sample_id: str, store: str = "appliance://10.0.0.1:8001", **fields: str) -> StreamRef:
    """A reference to ``sample_id`` of ``queue``'s run, kept at ``store``."""
    base = StreamRef(
        sample_id=sample_id,
        run_id=queue.run_id,
        store_uri=store,
        feature_keys={"hidden_states": "aux_hidden_states"},
        feature_specs={"hidden_states": ((7, 96), "bfloat16")},
        algorithm="eagle3",
        schema_version=1,
        num_tokens=7,
        estimated_bytes=1344,
        target_model_version=FINGERPRINT,
    )
    return replace(base, **fields)


def drain(queue: QueueBackend, consumer: str = "trainer-0") -> list[str]:
    """Lease and ack every pending sample; their ids in delivery order."""
    seen = []
    while (lease := queue.acquire(consumer)) is not None:
        queue.ack(lease.ref.sample_id, lease.lease_id)
        seen.append(lease.ref.sample_id)
    return seen


def test_put_queues_a_new_sample_replaces_a_pending_one_and_leaves_an_acked_one(queue_backend: Queues) -> None:
    queue = queue_backend.new()
    assert queue.put(ref(queue, "s1")) == PUT_NEW
    assert queue.put(ref(queue, "s1")) == PUT_REPLACED  # the same answer announced again
    assert queue.state().recomputed == 0
    assert queue.put(ref(queue, "s1", store="appliance://10.0.0.2:8001")) == PUT_REPLACED
    state = queue.state()
    assert (state.known, state.pending, state.recomputed) == (1, 1, 1)

    lease = queue.acquire("trainer-0")
    assert lease is not None and lease.ref.store_uri == "appliance://10.0.0.2:8001"
    assert lease.redelivery_count == 0 and lease.visibility_timeout_s == DESCRIPTION.visibility_timeout_s
    assert lease.ref == ref(queue, "s1", store="appliance://10.0.0.2:8001")
    queue.ack("s1", lease.lease_id)
    assert queue.put(ref(queue, "s1", store="appliance://10.0.0.3:8001")) == PUT_ACKED
    state = queue.state()
    assert (state.known, state.pending, state.leased, state.acked, state.recomputed) == (1, 0, 0, 1, 1)
    assert queue.acquire("trainer-0") is None
    assert queue.samples()[0].store_uri == "appliance://10.0.0.2:8001"  # the acked put changed nothing


def test_a_leased_sample_stays_leased_when_its_reference_moves(queue_backend: Queues) -> None:
    queue = queue_backend.new()
    queue.put(ref(queue, "s1"))
    lease = queue.acquire("trainer-0")
    assert lease is not None
    assert queue.put(ref(queue, "s1", store="appliance://10.0.0.9:8001")) == PUT_REPLACED
    state = queue.state()
    assert (state.pending, state.leased, state.recomputed) == (0, 1, 1)
    assert queue.acquire("trainer-1") is None
    queue.ack("s1", lease.lease_id)
    assert [s.state for s in queue.samples()] == ["acked"]


def test_samples_are_leased_in_the_order_they_were_put(queue_backend: Queues) -> None:
    queue = queue_backend.new()
    order = ["m", "b", "z", "a", "q"]
    for sample_id in order:
        queue.put(ref(queue, sample_id))
    queue.put(ref(queue, "b", store="appliance://10.0.0.2:8001"))  # a replacement keeps its place
    assert drain(queue) == order


def test_an_acked_sample_is_never_delivered_again(queue_backend: Queues) -> None:
    queue = queue_backend.new()
    for sample_id in ("s1", "s2"):
        queue.put(ref(queue, sample_id))
    assert drain(queue) == ["s1", "s2"]
    assert queue.reclaim_expired() == 0
    assert queue.acquire("trainer-1") is None
    state = queue.state()
    assert (state.pending, state.leased, state.acked, state.redelivered) == (0, 0, 2, 0)


def test_fail_returns_the_sample_at_once_and_counts_the_redelivery(queue_backend: Queues) -> None:
    queue = queue_backend.new()
    queue.put(ref(queue, "s1"))
    queue.put(ref(queue, "s2"))
    first = queue.acquire("trainer-0")
    assert first is not None and first.ref.sample_id == "s1"
    queue.fail("s1", first.lease_id)
    state = queue.state()
    assert (state.pending, state.leased, state.redelivered) == (2, 0, 1)
    assert queue.acquire("trainer-0").ref.sample_id == "s2"  # type: ignore[union-attr]
    again = queue.acquire("trainer-1")
    assert again is not None and again.ref.sample_id == "s1" and again.redelivery_count == 1
    assert again.lease_id != first.lease_id
    with pytest.raises(LeaseNotHeld, match="s1"):
        queue.fail("s1", first.lease_id)
    with pytest.raises(LeaseNotHeld, match=first.lease_id):
        queue.ack("s1", first.lease_id)
    queue.ack("s1", again.lease_id)


def test_an_expired_lease_goes_to_another_consumer_and_its_stale_ack_is_refused(queue_backend: Queues) -> None:
    producer = queue_backend.new(replace(DESCRIPTION, visibility_timeout_s=SHORT))
    producer.put(ref(producer, "s1"))
    slow, fast = queue_backend.connect(producer.run_id), queue_backend.connect(producer.run_id)
    stale = slow.acquire("slow-trainer")
    assert stale is not None and stale.visibility_timeout_s == SHORT
    assert fast.acquire("fast-trainer") is None  # still held
    time.sleep(SHORT + 0.3)
    fresh = fast.acquire("fast-trainer")
    assert fresh is not None and fresh.ref.sample_id == "s1" and fresh.redelivery_count == 1
    with pytest.raises(LeaseNotHeld, match="s1"):
        slow.ack("s1", stale.lease_id)
    fast.ack("s1", fresh.lease_id)
    fast.ack("s1", fresh.lease_id)  # a retried ack under the lease that acked it is no error
    state = producer.state()
    assert (state.acked, state.redelivered) == (1, 1)


def test_reclaim_expired_returns_expired_leases_to_pending(queue_backend: Queues) -> None:
    queue = queue_backend.new(replace(DESCRIPTION, visibility_timeout_s=SHORT))
    for sample_id in ("s1", "s2", "s3"):
        queue.put(ref(queue, sample_id))
    held = [queue.acquire("trainer-0") for _ in range(2)]
    assert queue.reclaim_expired() == 0
    time.sleep(SHORT + 0.3)
    assert queue.reclaim_expired() == 2
    state = queue.state()
    assert (state.pending, state.leased, state.redelivered) == (3, 0, 2)
    assert drain(queue) == ["s3", "s1", "s2"]  # returned samples queue up behind the pending one
    assert all(lease is not None for lease in held)


def test_ack_or_fail_of_a_lease_never_held_is_refused(queue_backend: Queues) -> None:
    queue = queue_backend.new()
    queue.put(ref(queue, "s1"))
    with pytest.raises(LeaseNotHeld, match="pending"):
        queue.ack("s1", "0123456789abcdef")  # not leased at all
    lease = queue.acquire("trainer-0")
    assert lease is not None
    with pytest.raises(LeaseNotHeld, match="0123456789abcdef"):
        queue.ack("s1", "0123456789abcdef")
    with pytest.raises(LeaseNotHeld):
        queue.fail("s1", "0123456789abcdef")
    with pytest.raises(UnknownSample, match="nope"):
        queue.ack("nope", lease.lease_id)
    with pytest.raises(UnknownSample, match="nope"):
        queue.fail("nope", lease.lease_id)
    queue.ack("s1", lease.lease_id)
    with pytest.raises(LeaseNotHeld, match="acked"):
        queue.fail("s1", lease.lease_id)


def test_a_run_nobody_opened_is_unknown(queue_backend: Queues) -> None:
    queue = queue_backend.new(description=None)
    with pytest.raises(UnknownRun, match=queue.run_id):
        queue.open()
    for call in (
        lambda: queue.put(ref(queue, "s1")),
        lambda: queue.acquire("trainer-0"),
        lambda: queue.ack("s1", "0123456789abcdef"),
        lambda: queue.fail("s1", "0123456789abcdef"),
        queue.reclaim_expired,
        lambda: queue.seal(1),
        queue.state,
        queue.samples,
    ):
        with pytest.raises(UnknownRun, match=queue.run_id):
            call()


def test_a_later_opener_must_describe_the_run_the_same_way(queue_backend: Queues) -> None:
    queue = queue_backend.new()
    other = queue_backend.connect(queue.run_id)
    assert other.open() == DESCRIPTION  # a consumer opens without a description
    assert other.open(replace(DESCRIPTION, visibility_timeout_s=5.0)) == DESCRIPTION  # the run's timeout stays
    with pytest.raises(RunMismatch, match="model_fingerprint"):
        other.open(replace(DESCRIPTION, model_fingerprint="model-b"))
    with pytest.raises(RunMismatch, match="encoding"):
        other.open(replace(DESCRIPTION, encoding="probs"))


def test_a_reference_of_another_model_or_run_is_refused(queue_backend: Queues) -> None:
    queue = queue_backend.new()
    with pytest.raises(RunMismatch, match="model-b"):
        queue.put(ref(queue, "s1", target_model_version="model-b"))
    with pytest.raises(RunMismatch, match="elsewhere"):
        queue.put(ref(queue, "s1", run_id="elsewhere"))
    assert queue.state().known == 0


def test_a_sealed_run_closes_once_every_sample_is_acked(queue_backend: Queues) -> None:
    queue = queue_backend.new()
    for sample_id in ("s1", "s2", "s3"):
        queue.put(ref(queue, sample_id))
    with pytest.raises(RunMismatch, match="3"):
        queue.seal(2)  # fewer than were put
    queue.seal(3)
    queue.seal(3)  # the same total again: agreed
    with pytest.raises(RunMismatch, match="3"):
        queue.seal(4)
    with pytest.raises(RunMismatch, match="sealed"):
        queue.put(ref(queue, "s4"))
    assert queue.put(ref(queue, "s2", store="appliance://10.0.0.2:8001")) == PUT_REPLACED
    state = queue.state()
    assert state.sealed and state.total == 3 and not state.closed
    drain(queue)
    state = queue.state()
    assert state.closed and (state.acked, state.total) == (3, 3)
    assert queue.acquire("trainer-0") is None


def test_samples_pages_through_the_run_in_sample_id_order(queue_backend: Queues) -> None:
    queue = queue_backend.new()
    ids = [f"s{i:02d}" for i in range(25)]
    for sample_id in reversed(ids):
        queue.put(ref(queue, sample_id, store=f"appliance://10.0.0.{int(sample_id[1:])}:8001"))
    lease = queue.acquire("trainer-0")  # s24: put first
    assert lease is not None and lease.ref.sample_id == "s24"
    queue.ack(lease.ref.sample_id, lease.lease_id)
    leased = queue.acquire("trainer-0")
    assert leased is not None and leased.ref.sample_id == "s23"

    pages, after = [], None
    while page := queue.samples(after=after, limit=10):
        pages.append(page)
        after = page[-1].sample_id
    assert [len(p) for p in pages] == [10, 10, 5]
    listed = [s for p in pages for s in p]
    assert [s.sample_id for s in listed] == ids
    assert [s.store_uri for s in listed[:2]] == ["appliance://10.0.0.0:8001", "appliance://10.0.0.1:8001"]
    assert {s.sample_id: s.state for s in listed if s.state != "pending"} == {"s23": "leased", "s24": "acked"}
    assert [s.sample_id for s in queue.samples(after="s1", limit=2)] == ["s10", "s11"]  # after any id
    with pytest.raises(ValueError, match="limit"):
        queue.samples(limit=MAX_STREAM_IDS_PER_REQUEST + 1)


def test_end_deletes_the_run(queue_backend: Queues) -> None:
    queue = queue_backend.new()
    queue.put(ref(queue, "s1"))
    queue.end()
    with pytest.raises(UnknownRun):
        queue.state()
    queue.end()  # ending again is no error (a retried request)
    queue.open(replace(DESCRIPTION, model_fingerprint="model-b"))  # a fresh run under the same id
    state = queue.state()
    assert (state.known, state.pending, state.description.model_fingerprint) == (0, 0, "model-b")
    assert queue.acquire("trainer-0") is None


def test_consumers_racing_for_the_samples_lease_each_exactly_once(queue_backend: Queues) -> None:
    producer = queue_backend.new()
    ids = [f"s{i:03d}" for i in range(50)]
    for sample_id in ids:
        producer.put(ref(producer, sample_id))
    consumers = [queue_backend.connect(producer.run_id) for _ in range(4)]
    leased: list[list[str]] = [[] for _ in consumers]
    start = threading.Barrier(len(consumers))

    def consume(index: int) -> None:
        start.wait()
        while (lease := consumers[index].acquire(f"trainer-{index}")) is not None:
            leased[index].append(lease.ref.sample_id)

    threads = [threading.Thread(target=consume, args=(i,)) for i in range(len(consumers))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    every = [s for got in leased for s in got]
    assert sorted(every) == ids  # each sample once: none lost, none twice
    state = producer.state()
    assert (state.pending, state.leased) == (0, 50)


def test_a_queue_server_that_is_down_is_unreachable(queue_backend: Queues) -> None:
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0" if queue_backend.url.startswith("redis") else f"appliance://127.0.0.1:{port}"
    queue = _connect(url, "run-down", retries=0, connect_timeout=2.0)
    try:
        with pytest.raises(QueueUnreachable, match=f"127.0.0.1:{port}"):
            queue.state()
        with pytest.raises(QueueUnreachable, match=f"127.0.0.1:{port}"):
            queue.acquire("trainer-0")
    finally:
        queue.close()
