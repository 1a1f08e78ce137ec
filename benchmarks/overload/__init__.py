"""``python -m benchmarks.overload``: served answers per second in a timeout storm, beside the unloaded rate."""
