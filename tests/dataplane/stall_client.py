"""A trainer rank that stops in the middle of a group transfer (run as its own process).

Usage: ``python stall_client.py URL MODE SEQ_LEN OUT`` with MODE ``die`` (SIGKILL itself once
it has received the transfer's header, while the tensors are being sent) or ``freeze``
(SIGSTOP itself once the answer's metadata is in; after SIGCONT it goes on receiving,
recovers over the wire and saves what it got to OUT). It brings up a gloo
group with one small batch first, then asks for a large answer (about 20 MB) so that the
transfer is far from done when it stops.
"""

from __future__ import annotations

import os
import signal
import sys

import torch

from eagle3_appliance.core.inputs import VocabMapping
from eagle3_client import RemoteEagle3TargetModel, wire
from eagle3_client.synthetic import random_batch, vocab_mapping
from eagle3_client.transports.group_plane import GroupDataPlane
from eagle3_client.transports.transfer import tag_for

VOCAB, DRAFT = 1024, 1000


def main(url: str, mode: str, seq_len: int, out: str) -> int:
    mapping = VocabMapping(*vocab_mapping(VOCAB, DRAFT, seed=7))
    remote = RemoteEagle3TargetModel.from_urls([url], data_plane="gloo", data_plane_backoff=0, max_retries=1)
    remote.set_vocab_mapping(mapping.selected_token_ids, mapping.selected_token_mask)
    remote.generate_batch(*random_batch(VOCAB, 1, 8, seed=0))
    server = remote._servers[0]
    plane = server.data_plane
    assert isinstance(plane, GroupDataPlane) and plane.tier == "gloo", plane
    keys = ("input_ids", "attention_mask", "loss_mask")
    payload = wire.encode(dict(zip(keys, random_batch(VOCAB, 2, seq_len, 1), strict=True)))
    seq, kind, answer = plane.request_transfer(payload)
    header = ""
    if mode == "die":  # take the transfer's first message, then vanish while the tensors are being sent
        box = torch.zeros(4, dtype=torch.int64)
        plane.group.pg.recv([box], 0, tag_for(seq)).wait()
        header = "header=" + ",".join(str(int(v)) for v in box)
    print(f"STOPPING seq={seq} kind={kind} port={plane.port} {header}", flush=True)
    os.kill(os.getpid(), signal.SIGKILL if mode == "die" else signal.SIGSTOP)
    result = plane.receive(seq, kind, answer, payload)  # only a frozen client gets here
    torch.save(result, out)
    stats = remote.transport_stats()[0]
    print(f"RECOVERED fallbacks={stats['fallbacks']} wire_bytes={stats['bytes']['wire']}", flush=True)
    remote.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]))
