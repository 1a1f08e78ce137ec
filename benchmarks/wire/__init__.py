"""``python -m benchmarks.wire``: transport throughput of the wire path against a raw loopback socket."""
