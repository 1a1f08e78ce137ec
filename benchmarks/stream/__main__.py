"""Entry point of ``python -m benchmarks.stream``."""

import sys

from benchmarks.stream.run import main

sys.exit(main())
