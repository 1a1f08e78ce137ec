"""Entry point of ``python -m benchmarks.pipelining``."""

from benchmarks.pipelining.run import main

main()
