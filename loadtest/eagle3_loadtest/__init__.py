"""Helpers shared by the locustfiles.

Modules whose names start with ``_`` are skipped by ``locust -f loadtest/``. The pure ones
(``_batches``, ``_validate``, ``_counters``, ``_steps``) never import locust, so the main
test session can unit-test them; the rest register Locust options and event listeners on
import and must only ever be imported by a locustfile.
"""
