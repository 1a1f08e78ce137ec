"""A trainer's side of a stream, as its own process: upstream's loader over ``open_stream``.

Run by tests/integration/test_stream.py::

    python -m tests.integration.stream_consumer QUEUE_URL RUN_ID OUT_DIR [--hold-after N] [--dflash]

Every batch it gets is saved to ``OUT_DIR/<sample_id>.<pid>.pt`` (its tensors), and its log
(``OUT_DIR/<pid>.log``) says ``acquired <id>`` and ``acked <id>`` as they happen. With
``--hold-after N`` it stops after its N-th batch, holding that lease unacked, prints
``holding <id>`` and sleeps (the test kills it there).
"""

from __future__ import annotations

import argparse
import faulthandler
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from eagle3_client.streaming.open import open_stream
from eagle3_client.streaming.stream_queue import StreamQueue

FIELDS = (
    "aux_hidden_states",
    "target_probs",
    "position_mask",
    "hidden_states",
    "logits",
    "input_ids",
    "attention_mask",
    "loss_mask",
    "position_ids",
    "seq_lens",
    "doc_remaining",
)


class LoggedQueue(StreamQueue):
    """The stream's queue, writing what it leases and acks to a log (flushed at once)."""

    log: Any
    last: str | None = None

    def acquire(self, *, poll_interval: float = 0.05) -> Any:
        lease = super().acquire(poll_interval=poll_interval)
        if lease is not None:
            self.last = lease.ref.sample_id
            self.log.write(f"acquired {lease.ref.sample_id} {lease.redelivery_count}\n")
            self.log.flush()
        return lease

    def ack(self, lease: Any) -> None:
        super().ack(lease)
        self.log.write(f"acked {lease.ref.sample_id}\n")
        self.log.flush()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("queue_url")
    parser.add_argument("run_id")
    parser.add_argument("out", type=Path)
    parser.add_argument("--hold-after", type=int, default=0)
    parser.add_argument("--dflash", action="store_true")
    parser.add_argument("--data-plane", default="auto")
    parser.add_argument("--step-seconds", type=float, default=0.0)
    args = parser.parse_args()
    faulthandler.dump_traceback_later(90, repeat=True)  # a consumer stuck somewhere says where, in its log
    queue, store = open_stream(args.queue_url, run_id=args.run_id, wait_for_run=60, data_plane=args.data_plane)
    logged = LoggedQueue(queue.backend, consumer=f"consumer-{os.getpid()}", on_ack=store.drop_acked)
    logged.log = (args.out / f"{os.getpid()}.log").open("a")
    if args.dflash:
        from eagle3_client.streaming.loader import DFlashFeatureLoader

        loader: Any = DFlashFeatureLoader(logged, store)
    else:
        from nemo_automodel.components.speculative.streaming import FeatureDataLoader

        loader = FeatureDataLoader(logged, store)
    count = 0
    for batch in loader:
        count += 1
        fields = {k: getattr(batch, k) for k in FIELDS if getattr(batch, k, None) is not None}
        torch.save(fields, args.out / f"{logged.last}.{os.getpid()}.pt")
        if args.hold_after and count >= args.hold_after:
            print(f"holding {logged.last}", flush=True)
            while True:
                time.sleep(60)
        time.sleep(args.step_seconds)
    print(f"done {count}", flush=True)
    store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
