"""Entry point of ``python -m benchmarks.wire``."""

from benchmarks.wire.run import main

main()
