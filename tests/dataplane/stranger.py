"""A stranger on the network who reaches a server's data-plane ports (run as its own process).

Usage: ``python stranger.py FIRST_PORT LAST_PORT MODE`` with MODE ``silent`` (joins and waits
for data) or ``guess`` (joins and sends a made-up join proof). It does what an attacker who
can only connect to the rendezvous ports can do: it connects to each port of the range as a
``TCPStore`` client, lists the keys as soon as there are any, takes the group's key prefix
from them, and joins the group as rank 1 with torch's own ``ProcessGroupGloo``. It prints
``JOINED`` when it got into the group, then reads the hello's number (the test hands it
over, as if the stranger knew everything but the secret) from stdin, tries to receive the
hello and the first transfer's header with those tags, and prints ``RECEIVED`` or ``NOTHING``.
"""

from __future__ import annotations

import datetime
import socket
import sys
import time

import torch
from torch.distributed import PrefixStore, ProcessGroupGloo, TCPStore

TIMEOUT = datetime.timedelta(seconds=20)


def find_prefix(first: int, last: int, limit: float = 60.0) -> tuple[TCPStore, str]:
    deadline = time.monotonic() + limit
    stores: dict[int, TCPStore] = {}
    while time.monotonic() < deadline:
        for port in range(first, last + 1):
            try:
                if port not in stores:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()  # listening at all?
                    stores[port] = TCPStore("127.0.0.1", port, 2, False, timeout=datetime.timedelta(seconds=5))
                keys = stores[port].list_keys()
            except Exception:  # noqa: BLE001 - nothing listening there (yet)
                stores.pop(port, None)
                continue
            if keys:
                # The group's store keys are "<prefix>/<gloo's own keys>": everything up to the first "/".
                return stores[port], keys[0].split("/", 1)[0] + "/"
        time.sleep(0.002)
    raise SystemExit("STRANGER found no rendezvous")


def main(first: int, last: int, mode: str) -> int:
    store, prefix = find_prefix(first, last)
    try:
        pg = ProcessGroupGloo(PrefixStore(prefix, store), 1, 2, TIMEOUT)
    except Exception as exc:  # noqa: BLE001
        print(f"NOT-JOINED {str(exc).splitlines()[0][:200]}", flush=True)
        return 0
    print(f"JOINED prefix={prefix}", flush=True)
    nonce = int(sys.stdin.readline())
    tag = nonce % (2**31 - 1)
    if mode == "guess":
        try:
            pg.send([torch.zeros(32, dtype=torch.uint8)], 0, tag).wait(datetime.timedelta(seconds=10))
        except Exception as exc:  # noqa: BLE001
            print(f"PROOF-FAILED {str(exc).splitlines()[0][:200]}", flush=True)
    header = torch.zeros(4, dtype=torch.int64)
    try:
        pg.recv([header], 0, tag).wait(datetime.timedelta(seconds=15))
    except Exception as exc:  # noqa: BLE001
        print(f"NOTHING {str(exc).splitlines()[0][:200]}", flush=True)
        return 0
    print(f"RECEIVED header={header.tolist()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]))
