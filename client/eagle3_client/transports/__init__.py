"""How bytes travel: the httpx control plane, the receive-into socket, the data planes, their negotiation.

May import the ground (``protocol``, ``wire``, ``encodings``, ``errors``, ``options``, ``auth``);
never ``remote`` or the adapters above it.
"""
