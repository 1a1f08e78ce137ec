"""Entry point of ``python -m benchmarks.dflash``."""

from benchmarks.dflash.run import main

main()
