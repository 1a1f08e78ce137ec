"""The HTTP face: Sanic routes, the ``/generate`` pipeline and its jobs, connections and scheduling.

May import ``dataplanes``, ``model``, ``ops``, ``core`` and the ground (``settings``, ``errors``);
only the entry points (``cli``, ``demo``, ``launch``, ``sizes``) import it.
"""
