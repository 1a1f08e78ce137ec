"""The yardstick: a raw loopback TCP socket moving the same bytes, sender in its own process.

The sender ``sendall``s from one preallocated, pre-touched buffer, in 1 MiB slices; the
receiver (this process) ``recv_into``s one preallocated, pre-touched buffer. No parsing, no
allocation, no framing: the most a Python process pair can move over 127.0.0.1 on this
machine, which is what the wire path is compared with. (One ``sendall`` of the whole
buffer measured ~2.4 GB/s here, 1 MiB slices 3.3-3.9 GB/s: the stronger yardstick is used.)
Only the standard library is imported here.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time

__all__ = ["SEND_SLICE", "loopback_seconds"]

SEND_SLICE = 1 << 20


def _sender(port: int, nbytes: int, reps: int) -> None:
    payload = bytearray(b"\x5a") * nbytes  # written, so its pages are resident
    view = memoryview(payload)
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(reps):
            if sock.recv(1) != b"g":
                return
            for start in range(0, nbytes, SEND_SLICE):
                sock.sendall(view[start : start + SEND_SLICE])


def loopback_seconds(nbytes: int, reps: int, timeout: float = 300.0) -> list[float]:
    """Seconds for each of ``reps`` transfers of ``nbytes`` (request byte to last byte received)."""
    target = bytearray(b"\x00") * nbytes
    view = memoryview(target)
    times: list[float] = []
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(timeout)
        port = server.getsockname()[1]
        args = [sys.executable, "-m", "benchmarks.wire.loopback", str(port), str(nbytes), str(reps)]
        proc = subprocess.Popen(args)
        try:
            conn, _ = server.accept()
            with conn:
                conn.settimeout(timeout)
                for _ in range(reps):
                    start = time.perf_counter()
                    conn.sendall(b"g")
                    got = 0
                    while got < nbytes:
                        n = conn.recv_into(view[got:])
                        if not n:
                            raise ConnectionError("loopback sender closed early")
                        got += n
                    times.append(time.perf_counter() - start)
        finally:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return times


if __name__ == "__main__":  # the sender process: PORT NBYTES REPS
    _sender(*(int(a) for a in sys.argv[1:4]))
