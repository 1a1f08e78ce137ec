"""``python -m benchmarks.dflash``: DFlash captures beside EAGLE-3 from one server (see ``run``)."""
