"""The read-ahead's bookkeeping (``StreamQueue``): a slot whose claim failed or whose lease ran out frees its place."""

from __future__ import annotations

import time

from eagle3_client.protocol import LeaseJSON, StreamRef
from eagle3_client.streaming.appliance_queue import ApplianceQueue
from eagle3_client.streaming.stream_queue import StreamQueue


def _lease(sample_id: str) -> LeaseJSON:
    ref = StreamRef(
        sample_id=sample_id,
        run_id="r",
        store_uri="appliance://127.0.0.1:9",
        feature_keys={"input_ids": "input_ids"},
        feature_specs={"input_ids": ((1, 4), "int64")},
        algorithm="eagle3",
        schema_version=1,
        num_tokens=4,
        estimated_bytes=32,
        target_model_version="m",
    )
    return LeaseJSON(ref, "0123456789abcdef", 60.0, 0)


def test_out_of_order_a_failed_slot_frees_its_place() -> None:
    """Out of order, slots whose claim failed (None) anywhere must go, or the readers, which wait
    while the slots are full, wait forever (what froze the stream benchmark's freeze scenario)."""
    queue = StreamQueue(ApplianceQueue("appliance://127.0.0.1:9", "r"), read_ahead=0)
    queue._slots = {3: None, 4: (_lease("b"), time.monotonic()), 5: None}
    taken = queue._take_ready()
    assert taken is not None and taken[0].ref.sample_id == "b"
    assert queue._slots == {}


def test_in_order_a_failed_head_is_skipped_and_an_expired_lease_dropped() -> None:
    queue = StreamQueue(ApplianceQueue("appliance://127.0.0.1:9", "r"), read_ahead=0, in_order=True)
    old = time.monotonic() - 120  # granted two minutes ago: its 60 s lease ran out while it waited
    queue._slots = {0: None, 1: (_lease("late"), old), 2: (_lease("c"), time.monotonic())}
    taken = queue._take_ready()  # 0 failed, 1 outlived its lease: both skipped, never handed out
    assert taken is not None and taken[0].ref.sample_id == "c"
    assert queue._next == 3 and queue._slots == {}
