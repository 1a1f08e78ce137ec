"""Wires the operations features into an app: GPU health, probes, metrics, auth, admission, leases, drain.

:func:`install_operations` is the one call ``create_app`` makes. It hooks Sanic's request
lifecycle signals rather than each handler, so every endpoint (other branches' too) is
authenticated, counted and drained alike:

* ``http.routing.after`` (before the body is read): auth (every endpoint but the probes),
  refusing new work while draining, the connection limits' per-request checks (probe slots,
  body size, body budget), opening the in-flight record;
* ``http.lifecycle.response`` (after the handler, streamed bodies included): request
  counters and latency, closing the record, renewing the session's lease;
* ``http.lifecycle.complete`` (connection closed): closing a record whose client vanished,
  releasing its body budget.

``/generate`` additionally goes through :mod:`eagle3_appliance.serving.pipeline` for the bounded
queue, the request-time limit and the queue / forward / encode / send timings.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from sanic import Blueprint, Request, Sanic
from sanic.response import HTTPResponse, json, raw

from eagle3_appliance.core.admission import Admission
from eagle3_appliance.core.sessions import SessionRegistry
from eagle3_appliance.errors import Unavailable
from eagle3_appliance.ops.auth import BearerAuth
from eagle3_appliance.ops.gpu import GpuMonitor
from eagle3_appliance.ops.health import PROBE_ENDPOINTS, probes
from eagle3_appliance.ops.inflight import InFlight, Tracked
from eagle3_appliance.ops.lifecycle import Lifecycle
from eagle3_appliance.ops.metrics import CONTENT_TYPE, Metrics
from eagle3_appliance.serving.connections import ConnectionGuard, close_after_response
from eagle3_appliance.settings import Settings
from eagle3_client import protocol

__all__ = ["Operations", "client_gone", "install_operations", "operations"]

T = TypeVar("T")

# Endpoints that are not "work": served while draining, not waited for by the drain.
_NOT_WORK = PROBE_ENDPOINTS | {protocol.EP_METRICS, protocol.EP_GPUS, protocol.EP_HEARTBEAT, protocol.EP_DISCONNECT}


@dataclass
class Operations:
    """Everything the operations features share; lives on ``app.ctx.ops``."""

    settings: Settings
    sessions: SessionRegistry
    gpu: GpuMonitor
    admission: Admission
    inflight: InFlight
    lifecycle: Lifecycle
    metrics: Metrics
    auth: BearerAuth | None
    target_loaded: Callable[[], bool]
    connections: ConnectionGuard
    target_faults: Callable[[], list[str]] = list  # why the loaded target cannot compute (a failed rank)

    def readiness_reasons(self) -> list[str]:
        """Why the server should not get traffic now; empty when it is ready (``/health/ready``)."""
        reasons = []
        if self.target_loaded() is False:
            reasons.append("model not loaded")
        if self.lifecycle.draining:
            reasons.append("draining: the server is shutting down")
        reasons += [f"fatal GPU condition: {r}" for r in self.gpu.snapshot.fatal_reasons()]
        reasons += self.target_faults()
        return reasons

    def ready(self) -> bool:
        return not self.readiness_reasons()

    # -- request lifecycle hooks ----------------------------------------------------

    def routed(self, request: Request, route: Any) -> None:
        endpoint = str(route.path).strip("/")
        request.ctx.ops_endpoint = endpoint
        request.ctx.ops_start = time.perf_counter()
        if (
            self.auth is not None and endpoint not in PROBE_ENDPOINTS
        ):  # probes are open: see eagle3_appliance.ops.health
            try:
                self.auth.check(request.headers.get(protocol.AUTH_HEADER))
            except Exception:
                close_after_response(request)  # no second try on this connection
                raise
        work = endpoint not in _NOT_WORK
        if work and self.lifecycle.draining:
            raise Unavailable(
                "the server is shutting down and takes no new work; use another server",
                headers=self.admission.retry_after(),
            )
        # After auth: an unauthenticated body is never stored (Sanic reads and drops it).
        self.connections.admit_request(request, endpoint)
        tracked = self.inflight.begin(endpoint, request.headers.get(protocol.SESSION_HEADER), work=work)
        request.ctx.ops_tracked = tracked
        if request.conn_info is not None:  # closes the record if the client vanishes mid-request
            request.conn_info.ctx.ops_tracked = tracked

    def responded(self, request: Request, status: int) -> None:
        endpoint = getattr(request.ctx, "ops_endpoint", None) or "unmatched"
        start = getattr(request.ctx, "ops_start", None)
        seconds = time.perf_counter() - start if start is not None else None
        if client_gone(request):  # Sanic answers a cancelled handler with a 500 nobody receives
            self.metrics.observe_request(endpoint, "aborted", None)
        else:
            self.metrics.observe_request(endpoint, status, seconds)
        tracked: Tracked | None = getattr(request.ctx, "ops_tracked", None)
        if tracked is not None and self.inflight.end(tracked):
            self.sessions.touch(tracked.session_id)
        self.connections.request_ended(request.ctx)
        if status == 200 and endpoint == protocol.EP_SESSION:
            self.metrics.sessions_registered.inc()
            self.lifecycle.session_registered()
        elif status == 200 and endpoint == protocol.EP_DISCONNECT:
            if not request.headers.get(protocol.SESSION_HEADER):
                self.lifecycle.upstream_disconnected()

    def connection_closed(self, conn_info: Any) -> None:
        self.connections.request_ended(conn_info.ctx)
        tracked: Tracked | None = getattr(conn_info.ctx, "ops_tracked", None)
        if tracked is not None and self.inflight.end(tracked):
            self.metrics.observe_request(tracked.endpoint, "aborted", None)


def client_gone(request: Request) -> bool:
    """The client hung up before its answer was made: whatever the status, it is not the server's failure."""
    return request.conn_info is not None and request.conn_info.lost


def operations(request: Request) -> Operations:
    ops: Operations = request.app.ctx.ops
    return ops


# -- routes: /metrics and /gpus (the probes are in eagle3_appliance.ops.health) ------------------------

ops_routes = Blueprint("operations")


@ops_routes.get(protocol.path(protocol.EP_METRICS))
async def metrics(request: Request) -> HTTPResponse:
    return raw(operations(request).metrics.exposition(), content_type=CONTENT_TYPE)


@ops_routes.get(protocol.path(protocol.EP_GPUS))
async def gpus(request: Request) -> HTTPResponse:
    """A fresh NVML reading (in a worker thread: NVML calls take milliseconds per GPU)."""
    report = await asyncio.to_thread(operations(request).gpu.read)
    return json(report.to_json())


def install_operations(app: Sanic, settings: Settings, sessions: SessionRegistry) -> Operations:
    """Create the operations state on ``app.ctx.ops`` and hook it into the app's lifecycle."""
    inflight = InFlight()
    admission = Admission(settings.max_queue)
    monitor = GpuMonitor(poll_interval=settings.gpu_poll_interval)
    metrics_ = Metrics(
        monitor=monitor,
        inflight=lambda: admission.inflight,
        queued=lambda: admission.queued,
        computing=lambda: admission.computing,
        clients=lambda: len(sessions.registered()),
        ready=lambda: app.ctx.ops.ready(),
        draining=lambda: app.ctx.ops.lifecycle.draining,
    )
    lifecycle = Lifecycle(
        app,
        settings,
        sessions,
        inflight,
        admission,
        on_session_end=lambda reason: metrics_.session_ends.labels(reason).inc(),
    )
    ops = Operations(
        settings=settings,
        sessions=sessions,
        gpu=monitor,
        admission=admission,
        inflight=inflight,
        lifecycle=lifecycle,
        metrics=metrics_,
        auth=BearerAuth(settings.auth_token) if settings.auth_token else None,
        target_loaded=lambda: getattr(app.ctx, "state", None) is not None,
        connections=ConnectionGuard(
            max_connections=settings.max_connections,
            header_timeout=settings.header_timeout,
            body_timeout=settings.body_timeout,
            keep_alive_timeout=settings.keep_alive_timeout,
            max_pending_body_bytes=settings.max_pending_body_bytes,
            max_body_bytes=settings.max_body_bytes,
            registry=metrics_.registry,
        ),
    )
    app.ctx.ops = ops
    app.blueprint(probes)
    app.blueprint(ops_routes)

    @app.signal("http.routing.after")
    async def _routed(request: Request, route: Any, **_: Any) -> None:
        ops.routed(request, route)

    @app.signal("http.lifecycle.response")
    async def _responded(request: Request, response: Any, **_: Any) -> None:
        ops.responded(request, int(getattr(response, "status", 500)))

    @app.signal("http.lifecycle.complete")
    async def _closed(conn_info: Any, **_: Any) -> None:
        ops.connection_closed(conn_info)

    @app.before_server_start
    async def _start(app: Sanic) -> None:
        await asyncio.to_thread(monitor.start)
        lifecycle.start_reaper()

    app.before_server_stop(lifecycle.drain)

    @app.after_server_stop
    async def _stop(app: Sanic) -> None:
        await asyncio.to_thread(monitor.stop)

    return ops
