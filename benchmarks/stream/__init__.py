"""``python -m benchmarks.stream``: a trainer fed three ways (blocking, prefetch, the stream) through faults."""
