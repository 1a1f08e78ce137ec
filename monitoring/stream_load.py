"""A short real stream run against one appliance, so that every ``eagle3_stream_*`` series exists.

Run by ``.ci/prometheus.sh`` (the appliance started with a small ``--stream-memory-mb``)::

    python -m monitoring.stream_load --url http://127.0.0.1:8001

What it does, each step moving the counters and gauges the dashboard's Stream row reads:

1. registers a session (``probs``) and sends a vocab mapping;
2. produces samples of one run until the appliance refuses one at its high watermark
   (``produced``, ``resident``, ``refused``, ``paused``);
3. claims two of them (``claimed``) and releases one (``POST /stream/release``:
   ``released{reason="acked"}``), then produces until refused again: the appliance stays
   paused (``eagle3_stream_paused`` 1, what ``Eagle3StreamProducerPaused`` watches);
4. opens the run on the queue the appliance hosts (``appliance://``), puts the references,
   leases them, acks them but one that it fails first (``redelivered``), and asks for a lease
   while none is pending, twice, a scrape apart (``empty``, what ``Eagle3StreamTrainersStarving``
   watches): the ``eagle3_stream_queue_*`` series, one run's worth.

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
from itertools import count

import httpx

from eagle3_client import protocol, wire
from eagle3_client.capture import EAGLE3
from eagle3_client.errors import TargetOverloaded
from eagle3_client.remote.core import RemoteTarget
from eagle3_client.remote.request import encode_request
from eagle3_client.remote.session import ServerSession
from eagle3_client.streaming.queues import QueueBackend
from eagle3_client.synthetic import random_batch, vocab_mapping

__all__ = ["main"]

QUEUE_MODULE = "eagle3_client.streaming.appliance_queue"
RUN_ID = "ci-stream"
DRAFT_VOCAB = 512
BATCH, SEQ_LEN = 2, 32  # about 180 KiB an answer in probs: a few fill 1 MiB
CONSUMER = "ci-trainer"
EMPTY_GAP_S = 2.5  # longer than the CI scrape interval (1 s)


def say(line: str) -> None:
    print(f"stream_load: {line}", flush=True)


class Stream:
    """One session on the appliance, producing samples ``s000``, ``s001``, ... of one run."""

    def __init__(self, url: str, run_id: str) -> None:
        self.url, self.run_id = url, run_id
        self.target = RemoteTarget([url], encoding="probs")
        self.target._fleet.start()
        self.server: ServerSession = self.target._servers[0]
        self.vocab = int(self.target.model_info()["vocab_size"])
        ids, mask = vocab_mapping(self.vocab, min(DRAFT_VOCAB, self.vocab), seed=0)
        self.server.set_vocab_mapping(wire.encode({"selected_token_ids": ids, "selected_token_mask": mask}), 1)
        self.refs: list[protocol.StreamRef] = []
        self.refused = 0
        self._ids = count()

    def produce_until_refused(self, most: int) -> int:
        """Produce until the appliance refuses a sample (or ``most`` are kept); how many were kept."""
        for kept in range(most):
            n = next(self._ids)
            _, payload, _ = encode_request(*random_batch(self.vocab, BATCH, SEQ_LEN, seed=n))
            try:
                self.refs.append(self.server.produce(self.run_id, f"s{n:03d}", payload))
            except TargetOverloaded as exc:
                self.refused += 1
                say(f"s{n:03d} refused: {exc.server_message.splitlines()[0][:100]}")
                return kept
        return most

    def claim_and_release(self) -> int:
        """Claim the first two answers, release the first; how many the appliance released."""
        for ref in self.refs[:2]:
            self.target.claim(ref.run_id, ref.sample_id)
        body = protocol.ReleaseRequest(self.run_id, (self.refs[0].sample_id,)).to_json()
        resp = httpx.post(f"{self.url}/{protocol.EP_STREAM_RELEASE}", json=body, timeout=30, trust_env=False)
        resp.raise_for_status()
        return int(resp.json()["released"])

    def close(self) -> None:
        self.target.close()


def queue_run(url: str, run_id: str, refs: list[protocol.StreamRef]) -> dict[str, int]:
    """Step 4: the run on the appliance-hosted queue, one trainer's leases on it; its counts at the end."""
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
        lease = queue.acquire(CONSUMER)
        if lease is None:
            raise RuntimeError(f"no lease with {len(refs)} samples put")
        queue.fail(lease.ref.sample_id, lease.lease_id)  # back to pending: redelivered
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
    parser.add_argument("--samples", type=int, default=20, help="most samples produced before each refusal")
    parser.add_argument("--without-queue", action="store_true", help="skip step 4 (the appliance-hosted queue)")
    args = parser.parse_args(argv)
    url = args.url.rstrip("/")
    if not args.without_queue and importlib.util.find_spec(QUEUE_MODULE) is None:
        say(f"FAIL {QUEUE_MODULE} is missing: the run queue an appliance hosts is not in this checkout")
        say("(--without-queue runs the rest; the eagle3_stream_queue_* panels then have no data)")
        return 2
    stream = Stream(url, args.run_id)
    try:
        first = stream.produce_until_refused(args.samples)
        if first < 2 or stream.refused != 1:
            say(f"FAIL {first} samples kept, {stream.refused} refused: expected at least 2, then a refusal")
            return 1
        released = stream.claim_and_release()
        if released != 1:
            say(f"FAIL /stream/release released {released} answers, expected 1")
            return 1
        again = stream.produce_until_refused(args.samples)
        say(f"{first} samples kept, 2 claimed, 1 released, {again} more kept; {stream.refused} refused")
        if stream.refused != 2:
            say("FAIL the appliance did not refuse a producer again")
            return 1
        if args.without_queue:
            say("queue step skipped (--without-queue)")
            return 0
        counts = queue_run(url, args.run_id, stream.refs)
        say(f"queue of run {args.run_id}: {counts}")
        wanted = {"pending": 0, "leased": 0, "acked": len(stream.refs), "redelivered": 1}
        if counts != wanted:
            say(f"FAIL the queue's counts are {counts}, expected {wanted}")
            return 1
    finally:
        stream.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
