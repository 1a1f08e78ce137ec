"""The generic remote target: one server's session, the fleet that routes over them, the request core.

May import ``transports`` and the ground; the EAGLE-3 (and DFlash) adapters are thin classes over it.
"""
