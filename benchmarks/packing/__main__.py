"""Entry point of ``python -m benchmarks.packing``."""

from benchmarks.packing.run import main

main()
