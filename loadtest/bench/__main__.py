"""Entry point of ``python -m loadtest.bench``."""

from loadtest.bench._main import main

main()
