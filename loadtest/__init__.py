"""Locust load tests that use a target server the way EAGLE-3 training ranks do.

Every ``*.py`` directly in this folder is a locustfile (one per scenario); ``common/`` holds
the helpers, all in ``_``-prefixed modules because ``locust -f loadtest/`` imports every
``.py`` file below the folder whose name does not start with ``_``.
"""
