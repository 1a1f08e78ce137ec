"""The shared TLS context still verifies certificates as httpx's own default does."""

from __future__ import annotations

import ssl

from eagle3_client.transports.control import ControlPlane
from eagle3_client.transports.tls import tls_context


def test_the_shared_context_verifies_certificates_and_host_names() -> None:
    context = tls_context()
    assert context is tls_context()  # made once per process
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert context.cert_store_stats()["x509_ca"] > 0  # the CA bundle is loaded


def test_every_control_client_uses_it() -> None:
    clients = [ControlPlane(f"https://127.0.0.1:{port}") for port in (1, 2)]
    try:
        pools = [c._transport._fallback._pool for c in clients]  # type: ignore[attr-defined]
        assert all(pool._ssl_context is tls_context() for pool in pools)
    finally:
        for c in clients:
            c.close()
