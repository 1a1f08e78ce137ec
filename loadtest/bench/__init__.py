"""``python -m loadtest.bench``: transport throughput of the wire path against a raw loopback socket.

Every module in this package starts with ``_`` so that ``locust -f loadtest/`` (which imports
every other ``.py`` below ``loadtest/``) never imports the benchmark; importing this package
has no side effects.
"""
