"""``python -m benchmarks.long``: long samples with the LM head over the whole sequence and over slices."""
