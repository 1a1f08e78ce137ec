"""``python -m benchmarks.packing``: useful tokens/s of packed rows against padded batches of the same documents."""
