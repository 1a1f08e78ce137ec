"""Benchmarks: commands that print numbers, each beside its baseline in the same run.

Run from a checkout (they are not part of the installed distribution)::

    python -m benchmarks.wire        # /generate over the wire against a raw loopback socket
    python -m benchmarks.transport   # the data planes (gloo, wire) against a raw socket
    python -m benchmarks.stream      # a trainer fed blocking, prefetched and by the stream, through faults
"""
