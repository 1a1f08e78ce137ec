"""The frozen target and what it computes: loading, the forward with captures, supervision, limits.

May import ``core`` and the ground (``settings``, ``errors``); never ``serving``, ``dataplanes``
or ``ops``. No web code.
"""
