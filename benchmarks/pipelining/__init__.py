"""``python -m benchmarks.pipelining``: served answers/s with 1 and 2 requests in flight beside the in-process rate."""
