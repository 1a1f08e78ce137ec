"""One TLS context per process for every HTTP client of the package.

httpx builds a fresh ``SSLContext`` (and reads the whole CA bundle, ~36 ms of one core) for
every client it creates, even one that only ever speaks plain ``http://``. The client opens one
control client per appliance and one per queue, so a trainer that starts (or restarts) its
stream paid that on its first steps. The context here is the one httpx would build with
``trust_env=False`` (certifi's bundle, certificates verified), made once and shared; an
``SSLContext`` may be used by many connections and threads at once.
"""

from __future__ import annotations

import functools
import ssl

__all__ = ["tls_context"]


@functools.cache
def tls_context() -> ssl.SSLContext:
    import certifi

    return ssl.create_default_context(cafile=certifi.where())
