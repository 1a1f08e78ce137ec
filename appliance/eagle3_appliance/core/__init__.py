"""The request types every layer shares: decoded inputs, sessions and admission tickets.

May import only the ground (``settings``, ``errors``); every other subpackage may import it.
"""
