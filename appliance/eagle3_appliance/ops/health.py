"""Liveness and readiness probes, also under the KServe / Triton v2 paths.

Every probe (:data:`PROBE_ENDPOINTS`, upstream's ``/health`` included) answers without a token
even on a server started with one: orchestrators, Docker's ``HEALTHCHECK`` and the Slurm
scripts probe without credentials, and a probe tells only the server's own state (serving,
loading, draining, a GPU fault), nothing about its model, clients or data.

* ``/health/live`` (``/v2/health/live``): the process serves HTTP, so an orchestrator can
  always tell a hung process from a busy one.
* ``/health/ready`` (``/v2/health/ready``): the model is loaded, the server is not draining
  for shutdown, and no visible GPU has a fatal condition (an XID from
  :data:`eagle3_appliance.ops.gpu.FATAL_XIDS`, volatile uncorrected ECC errors, a row-remap failure,
  a lost GPU). Otherwise ``503`` with every reason.
* ``/health`` stays exactly upstream's: ``200 {"status": "ok"}`` while the process serves.

Both probes read only in-memory state (the GPU monitor's cached snapshot), never NVML or
the model thread, so they answer in milliseconds while a forward runs.
"""

from __future__ import annotations

from typing import Protocol

from sanic import Blueprint, Request
from sanic.response import HTTPResponse, json

from eagle3_client import protocol

__all__ = ["LIVENESS_ENDPOINTS", "PROBE_ENDPOINTS", "Readiness", "probes"]

LIVENESS_ENDPOINTS = frozenset({protocol.EP_HEALTH_LIVE, protocol.EP_V2_HEALTH_LIVE})
PROBE_ENDPOINTS = LIVENESS_ENDPOINTS | {protocol.EP_HEALTH, protocol.EP_HEALTH_READY, protocol.EP_V2_HEALTH_READY}


class Readiness(Protocol):
    """What the readiness probe asks (``app.ctx.ops``, :class:`eagle3_appliance.serving.operations.Operations`)."""

    def readiness_reasons(self) -> list[str]:
        """Why the server should not get traffic now; empty when it is ready."""
        ...


async def live(request: Request) -> HTTPResponse:
    return json({"status": "live"})


async def ready(request: Request) -> HTTPResponse:
    readiness: Readiness = request.app.ctx.ops
    reasons = readiness.readiness_reasons()
    if reasons:
        return json({"status": "not_ready", "reasons": reasons, "error": "not ready: " + "; ".join(reasons)}, 503)
    return json({"status": "ready"})


probes = Blueprint("probes")
probes.add_route(live, protocol.path(protocol.EP_HEALTH_LIVE), methods=["GET"], name="health_live")
probes.add_route(live, protocol.path(protocol.EP_V2_HEALTH_LIVE), methods=["GET"], name="v2_health_live")
probes.add_route(ready, protocol.path(protocol.EP_HEALTH_READY), methods=["GET"], name="health_ready")
probes.add_route(ready, protocol.path(protocol.EP_V2_HEALTH_READY), methods=["GET"], name="v2_health_ready")
