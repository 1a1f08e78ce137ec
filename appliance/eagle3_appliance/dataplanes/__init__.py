"""How an answer leaves the server: the HTTP wire, our NCCL/gloo groups and upstream's NCCL path.

May import ``core`` and the ground (``settings``, ``errors``); never ``serving``, ``model`` or ``ops``.
"""
