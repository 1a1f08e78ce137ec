"""A short real stream run against one appliance, so that every ``eagle3_stream_*`` series exists.

Run by ``.ci/prometheus.sh`` (the appliance started with a small ``--stream-memory-mb``)::

    python -m monitoring.stream_load --url http://127.0.0.1:8001

What it does, each step moving the counters and gauges the dashboard's Stream row reads:

1. registers a session (``probs``) and sends a vocab mapping;
2. produces samples of one run until the appliance refuses one at its high watermark
   (``produced``, ``resident``, ``refused``, ``paused``), at most ``--samples``;
3. claims two of them (``claimed``) and releases one (``POST /stream/release``: ``released{reason="acked"}``);
4. opens the run on the queue the appliance hosts (``appliance://``), puts the references,
   leases them, acks one, fails one (``redelivered``), and asks for a lease while none is
   pending, twice (``empty``): the ``eagle3_stream_queue_*`` series, one run's worth.

Step 4 needs :mod:`eagle3_client.streaming.appliance_queue`; without it the script says so
and exits 2 (``--without-queue`` skips the step: the queue panels then have no data).
Exit 1 with what failed.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
import time

import httpx

from eagle3_client import protocol, wire
from eagle3_client.capture import EAGLE3
from eagle3_client.errors import TargetOverloaded
from eagle3_client.remote.core import RemoteTarget
from eagle3_client.remote.request import encode_request
from eagle3_client.streaming.queues import QueueBackend
from eagle3_client.synthetic import random_batch, vocab_mapping

__all__ = ["main"]

QUEUE_MODULE = "eagle3_client.streaming.appliance_queue"
RUN_ID = "ci-stream"
DRAFT_VOCAB = 512
BATCH, SEQ_LEN = 2, 32
CONSUMER = "ci-trainer"
EMPTY_GAP_S = 2.5  # longer than the CI scrape interval (1 s)


def say(line: str) -> None:
    print(f"stream_load: {line}", flush=True)


def produce(url: str, run_id: str, samples: int) -> tuple[RemoteTarget, list[protocol.StreamRef], int]:
    """Steps 1 and 2: the target (its session open), the references produced, and the refusals."""
    target = RemoteTarget([url], encoding="probs")
    target._fleet.start()
    server = target._servers[0]
    vocab = int(target.model_info()["vocab_size"])
    ids, mask = vocab_mapping(vocab, min(DRAFT_VOCAB, vocab), seed=0)
    server.set_vocab_mapping(wire.encode({"selected_token_ids": ids, "selected_token_mask": mask}), 1)
    refs: list[protocol.StreamRef] = []
    refused = 0
    for n in range(samples):
        _, payload, _ = encode_request(*random_batch(vocab, BATCH, SEQ_LEN, seed=n))
        try:
            refs.append(server.produce(run_id, f"s{n:03d}", payload))
        except TargetOverloaded as exc:
            refused += 1
            say(f"sample s{n:03d} refused at the high watermark ({exc.server_message.splitlines()[0][:120]})")
            break
    return target, refs, refused


def claim_and_release(url: str, target: RemoteTarget, refs: list[protocol.StreamRef]) -> int:
    """Step 3: claim the first two answers, release the first; how many the appliance released."""
    for ref in refs[:2]:
        target.claim(ref.run_id, ref.sample_id)
    body = protocol.ReleaseRequest(refs[0].run_id, (refs[0].sample_id,)).to_json()
    resp = httpx.post(f"{url}/{protocol.EP_STREAM_RELEASE}", json=body, timeout=30, trust_env=False)
    resp.raise_for_status()
    return int(resp.json()["released"])


def queue_run(url: str, run_id: str, refs: list[protocol.StreamRef]) -> dict[str, int]:
    """Step 4: the run on the appliance-hosted queue, one trainer's leases on it; its state at the end."""
    # Imported by name: main() has checked that this checkout has it.
    backend = importlib.import_module(QUEUE_MODULE).ApplianceQueue
    queue: QueueBackend = backend("appliance://" + url.removeprefix("http://"), run_id, auth_token=None)
    try:
        queue.open(
            protocol.RunDescription(
                algorithm="eagle3",
                capture=EAGLE3.spec,
                encoding="probs",
                model_fingerprint=refs[0].target_model_version,
                draft_vocab_size=DRAFT_VOCAB,
            )
        )
        for ref in refs:
            queue.put(ref)
        first, second = queue.acquire(CONSUMER), queue.acquire(CONSUMER)
        if first is None or second is None:
            raise RuntimeError(f"two leases asked for, {len(refs)} samples pending: got {first} and {second}")
        queue.ack(first.ref.sample_id, first.lease_id)
        queue.fail(second.ref.sample_id, second.lease_id)  # back to pending: redelivered
        while (lease := queue.acquire(CONSUMER)) is not None:
            queue.ack(lease.ref.sample_id, lease.lease_id)
        for n in range(2):  # every sample acked: empty leases, a scrape apart (a rate sees the second)
            if n:
                time.sleep(EMPTY_GAP_S)
            if queue.acquire(CONSUMER) is not None:
                raise RuntimeError("a lease was handed out with every sample acked")
        queue.seal(len(refs))
        state = queue.state()
    finally:
        queue.close()
    return {"pending": state.pending, "leased": state.leased, "acked": state.acked, "redelivered": state.redelivered}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m monitoring.stream_load", description=__doc__.split("\n")[0])
    parser.add_argument("--url", required=True, help="the appliance, http://host:port")
    parser.add_argument("--run-id", default=RUN_ID)
    parser.add_argument("--samples", type=int, default=12, help="most samples produced (fewer once refused)")
    parser.add_argument("--without-queue", action="store_true", help="skip step 4 (the appliance-hosted queue)")
    args = parser.parse_args(argv)
    url = args.url.rstrip("/")
    has_queue = importlib.util.find_spec(QUEUE_MODULE) is not None
    if not has_queue and not args.without_queue:
        say(f"FAIL {QUEUE_MODULE} is missing: the run queue an appliance hosts is not in this checkout")
        say("(--without-queue runs the rest; the eagle3_stream_queue_* panels then have no data)")
        return 2
    target, refs, refused = produce(url, args.run_id, args.samples)
    try:
        say(f"{len(refs)} samples produced and kept, {refused} refused")
        if len(refs) < 2:
            say("FAIL fewer than 2 samples produced: raise --stream-memory-mb or lower the batch")
            return 1
        released = claim_and_release(url, target, refs)
        say(f"2 answers claimed, {released} released")
        if released != 1:
            say(f"FAIL /stream/release released {released} answers, expected 1")
            return 1
        if args.without_queue:
            say("queue step skipped (--without-queue)")
        else:
            counts = queue_run(url, args.run_id, refs)
            say(f"queue run {args.run_id}: {counts}")
            wanted = {"pending": 0, "leased": 0, "acked": len(refs), "redelivered": 1}
            if counts != wanted:
                say(f"FAIL the queue's counts are {counts}, expected {wanted}")
                return 1
    finally:
        target.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
