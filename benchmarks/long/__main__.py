"""Entry point of ``python -m benchmarks.long``."""

from benchmarks.long.run import main

main()
