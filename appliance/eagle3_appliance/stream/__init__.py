"""A run's stream on the appliance: answers kept resident where they were computed, and the queue an appliance hosts.

May import ``core`` and the ground (``settings``, ``errors``); the HTTP routes live in ``serving``.
"""
