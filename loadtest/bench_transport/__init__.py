"""Transport benchmark: ``python -m loadtest.bench_transport`` (see ``_main`` for what it measures).

The code lives in ``_``-prefixed modules so that ``locust -f loadtest/`` does not import it.
"""
