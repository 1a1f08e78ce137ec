"""A trainer-like client process with more than 1,100 open files (run by tests/test_many_fds.py).

Trainers reach fd numbers above 1023 (data-loader workers, NCCL, shared-memory tensors), where
``select.select`` raises ``ValueError``. This process opens that many descriptors first, so
every socket the client creates afterwards has a number above 1100, then runs several
``generate_batch`` calls on the tier it is told to use and checks each answer bit for bit
against the model run in this process. It prints one JSON line with what it saw.

Usage: python tests/many_fds_client.py URL TIER CACHE_DIR
"""

from __future__ import annotations

import json
import os
import resource
import sys
from pathlib import Path

OPEN_FILES = 1100


def hold_open_files(count: int) -> list[int]:
    """Raise the soft descriptor limit if needed and open ``count`` descriptors (pipes)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = count + 512
    if soft < want:
        if hard != resource.RLIM_INFINITY and hard < want:
            raise SystemExit(f"hard RLIMIT_NOFILE {hard} is below {want}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    fds: list[int] = []
    while len(fds) < count:
        fds.extend(os.pipe())
    return fds


def main(url: str, tier: str, cache_dir: str) -> None:
    held = hold_open_files(OPEN_FILES)
    import torch

    from eagle3_appliance.core.inputs import GenerateInputs, VocabMapping
    from eagle3_appliance.model.loading import load_target
    from eagle3_appliance.model.supervision import in_process, supervision_equal
    from eagle3_appliance.settings import Settings
    from eagle3_client import RemoteEagle3TargetModel
    from eagle3_client.synthetic import random_batch, vocab_mapping

    reference = load_target(Settings(cache_dir=Path(cache_dir)))
    mapping = VocabMapping(*vocab_mapping(reference.logits_size, 128))
    exact = []
    with RemoteEagle3TargetModel.from_urls([url], data_plane=tier, max_retries=0) as remote:
        remote.set_vocab_mapping(mapping.selected_token_ids, mapping.selected_token_mask)
        for seed in range(4):
            inputs = random_batch(reference.vocab_size, 2, 24, seed=seed)
            batch = remote.generate_batch(*inputs)
            exact.append(supervision_equal(batch, in_process(reference, GenerateInputs(*inputs), mapping)))
        stats = remote.transport_stats()[0]
    probe = os.open(os.devnull, os.O_RDONLY)  # the next free descriptor number
    print(
        json.dumps(
            {
                "held": len(held),
                "lowest_free_fd": probe,
                "exact": exact,
                "tier": stats["tier"],
                "bytes": {k: v for k, v in stats["bytes"].items() if v},
                "fallbacks": stats["fallbacks"],
                "torch": torch.__version__,
            }
        )
    )


if __name__ == "__main__":
    main(*sys.argv[1:4])
