"""Operating the process: health and readiness, metrics, GPU health (NVML), auth, leases and drain.

May import ``core`` and the ground (``settings``, ``errors``); never ``serving``, ``dataplanes`` or ``model``.
"""
