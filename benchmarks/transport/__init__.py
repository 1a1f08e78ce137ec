"""``python -m benchmarks.transport``: MB/s per data plane beside a raw loopback socket (see ``run``)."""
