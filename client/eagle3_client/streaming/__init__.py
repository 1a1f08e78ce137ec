"""The consumer and producer sides of a supervision stream (NeMo AutoModel's streaming API).

Appliances compute a run's batches ahead of the trainers and keep each answer where it was
computed; a queue (``appliance://host:port`` or ``redis://host:port/db``) carries tensor-free
references. :func:`open_stream` gives a trainer a ``(queue, store)`` pair that upstream's
``FeatureDataLoader`` accepts unchanged (EAGLE-3 runs); DFlash-family, DSpark, ViSpec and MSD
runs are read through :mod:`eagle3_client.streaming.loader`.

May import ``remote``, ``transports`` and the ground; never the adapters (``backend``, ``dflash``,
``dspark``, ``vlm``, ``vispec``, ``msd``): the batch builders they share live in the ground
(:mod:`eagle3_client.capture`).
"""
