"""GPU check of the stream: answers kept in GPU memory, claimed over NCCL (not collected by pytest; 1-2 min).

Run on a GPU machine::

    python tests/gpu/check_stream.py [--batches 6]

What the CPU tests cannot show: an appliance on ``cuda`` keeps its stream answers in GPU memory
and a claim sends them from there. One line each:

* a producer run over an appliance on ``cuda:0`` (the queue on the same appliance) closes, and
  the appliance reports the resident bytes while it runs;
* a consumer on upstream's ``FeatureDataLoader`` gets every batch once, bit-identical to a
  ``/generate`` of the same batch from the same server (on the wire from ``cuda:0`` with one GPU;
  over NCCL to ``cuda:1`` with two, with ``transport_stats`` saying ``nccl``).

No GPU (or no NeMo AutoModel): says so and exits 0. Exit code 0 when every check passed.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
from pathlib import Path
from typing import Any

import httpx
import torch

# The same PASS/FAIL lines as the data-plane check (run from this folder).
from check_dataplanes import FAILED, check

from eagle3_appliance.launch import ServerProcess
from eagle3_appliance.model.builtin_model import ensure_builtin_model
from eagle3_client import RemoteEagle3TargetModel
from eagle3_client.streaming.producer import Producer
from eagle3_client.synthetic import random_batch, vocab_mapping

VOCAB, DRAFT = 1024, 512
KEYS = ("aux_hidden_states", "target_probs", "position_mask", "input_ids", "loss_mask")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--seq-len", type=int, default=256)
    args = parser.parse_args()
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    print(f"== stream GPU check: {count} GPU(s) visible")
    if count == 0:
        print("no GPU visible: nothing to check here (tests/integration/test_stream.py covers the CPU)")
        return 0
    try:
        from nemo_automodel.components.speculative.streaming import FeatureDataLoader

        from eagle3_client.streaming.open import open_stream
    except ImportError as exc:
        print(f"NeMo AutoModel is not importable ({exc}): `make automodel` first; nothing checked")
        return 0
    cache = Path(tempfile.mkdtemp(prefix="eagle3-gpu-stream-"))
    ensure_builtin_model(cache)
    ids, mask = vocab_mapping(VOCAB, DRAFT, seed=1)
    batches = [
        dict(
            zip(("input_ids", "attention_mask", "loss_mask"), random_batch(VOCAB, 2, args.seq_len, seed=i), strict=True)
        )
        for i in range(args.batches)
    ]
    env = {"CUDA_VISIBLE_DEVICES": "0"} if count >= 2 else {}
    trainer = "cuda:1" if count >= 2 else "cuda:0"
    plane = "nccl" if count >= 2 else "auto"
    server_args = ["--cache-dir", str(cache), "--device", "cuda", "--stream-memory-mb", "64"]
    with ServerProcess(server_args, env=env, log_path=cache / "server.log", startup_timeout=600) as server:
        queue_url = "appliance://" + server.url.removeprefix("http://")
        peak = [0]
        done = threading.Event()

        def watch() -> None:
            while not done.is_set():
                body = httpx.get(server.url + "/stream/runs", trust_env=False).json()
                peak[0] = max(peak[0], body["resident_bytes"])
                done.wait(0.05)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        with Producer([server.url], queue_url, "gpu-check", batches, vocab_mapping=(ids, mask)) as producer:
            result: dict[str, Any] = {}
            thread = threading.Thread(target=lambda: result.update(report=producer.run(timeout=300)), daemon=True)
            thread.start()
            queue, store = open_stream(queue_url, run_id="gpu-check", device=trainer, data_plane=plane)
            got = [(queue, batch) for batch in FeatureDataLoader(queue, store)]
            thread.join(120)
            tiers = {t["tier"] for target in store._targets.values() for t in target.transport_stats()}
            store.close()
        done.set()
        check("the producer's run closed", "report" in result, str(result.get("report")))
        check("the appliance kept answers resident on the GPU while it ran", peak[0] > 0, f"peak {peak[0]} bytes")
        check(f"the claims used {plane}", plane == "auto" or tiers == {"nccl"}, str(tiers))
        with RemoteEagle3TargetModel.from_urls([server.url], device=trainer, data_plane=plane) as remote:
            remote.set_vocab_mapping(ids, mask)
            by_ids = {tuple(b["input_ids"].flatten().tolist()): b for b in batches}
            exact = len(got) == len(batches)
            for _, batch in got:
                source = by_ids[tuple(batch.input_ids.flatten().tolist())]
                want = remote.generate_batch(source["input_ids"], source["attention_mask"], source["loss_mask"])
                exact = exact and all(torch.equal(getattr(batch, k).cpu(), getattr(want, k).cpu()) for k in KEYS)
            check("every batch once, bit-identical to /generate from the same server", exact, f"{len(got)} batches")
    return 1 if FAILED else 0


if __name__ == "__main__":
    raise SystemExit(main())
