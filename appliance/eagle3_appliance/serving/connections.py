"""Client connections: deadlines, a cap below the descriptor limit, a body-memory budget, and liveness.

Why: Sanic measures its request timeout from the *last* byte received, so a client that
dribbles one header byte every few seconds is never closed; an idle keep-alive connection
lives for the whole keep-alive; nothing caps how many connections are open, so enough idle
ones exhaust the process's file descriptors and even ``/health/live`` stops answering; and a
body is held in memory while it is received, however slowly. This module replaces those
per-byte timeouts with totals and bounds the rest:

* **header deadline** (``--header-timeout``): from a request's first byte (for a new
  connection: from the accept) to the end of its headers. Beyond it: ``408`` and close.
* **body deadline** (``--body-timeout``): from the end of the headers to the body's last
  byte, in total. Beyond it: ``408`` and close.
* **keep-alive** (``--keep-alive-timeout``): an idle connection between two requests.
* **connection cap** (``--max-connections``, lowered to fit the open-file limit, whose
  soft value is raised to the hard one at start-up): at the cap, a new connection first
  replaces the one idle the longest (between requests, or connected without a byte sent);
  when none is idle, :data:`PROBE_SLOTS` more connections are accepted for health probes
  only (``/health``, ``/health/live``, ``/health/ready`` and their ``/v2`` spellings; headers
  within :data:`PROBE_HEADER_TIMEOUT_S`), answered and closed; beyond those, a new connection
  gets an immediate ``503`` with ``Retry-After`` and is closed. Hitting the cap is logged at
  most once per :data:`LOG_EVERY_S` seconds and counted.
* **body size**: a wire body (:data:`~eagle3_client.protocol.WIRE_BODY_ENDPOINTS`) at most
  ``--max-body-bytes``, any other (JSON, parsed on the event loop) at most
  :data:`~eagle3_client.protocol.MAX_JSON_BODY_BYTES`; a larger declared size gets ``413``
  before the body is read, a chunked body is cut off with ``413`` once it passes the limit,
  and the connection is closed. Until routing names the endpoint the smaller limit holds, so
  the body of a refused or unmatched request is never read beyond it either.
* **body budget** (``--max-pending-body-bytes``): the declared sizes of the bodies being
  received or held by requests in progress, all together. A request that would exceed it
  gets ``503`` with ``Retry-After`` before its body is read. The check runs after the
  bearer-token check, so an unauthenticated client never gets a body stored at all (its
  body is read and discarded, within the body deadline).

:class:`GuardedHttpProtocol` is the Sanic protocol that enforces the deadlines and the cap
(``app.prepare(protocol=...)``); :class:`ConnectionGuard` holds the counts and the budget
(``Operations.connections``). :func:`client_connected` tells the ``/generate`` pipeline,
from any thread, whether a request's client is still connected; once a body has been read
the protocol reads the socket again, so a departed client is noticed at once whatever the
body's size (Sanic stops reading above 64 KiB of buffered input, which hid departures).
"""

from __future__ import annotations

import logging
import math
import re
import resource
import select
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn

from prometheus_client import CollectorRegistry, Counter, Gauge
from sanic import Request
from sanic.exceptions import BadRequest, PayloadTooLarge, RequestTimeout, ServiceUnavailable
from sanic.http import Http, Stage
from sanic.server.protocols.http_protocol import HttpProtocol

from eagle3_appliance.errors import BodyTooLarge, Unavailable
from eagle3_appliance.ops.health import PROBE_ENDPOINTS
from eagle3_appliance.serving.request_head import head_problem
from eagle3_client import protocol

__all__ = [
    "FD_RESERVE",
    "LOG_EVERY_S",
    "MAX_CHUNK_LINE",
    "PROBE_HEADER_TIMEOUT_S",
    "PROBE_SLOTS",
    "ConnectionGuard",
    "GuardedHttpProtocol",
    "client_connected",
    "close_after_response",
    "connection_cap",
    "raise_fd_limit",
]

logger = logging.getLogger(__name__)

# Connections beyond --max-connections that may still ask a health probe.
PROBE_SLOTS = 2
# A connection on a probe slot must send its request's headers within this many seconds.
PROBE_HEADER_TIMEOUT_S = 2.0
# Descriptors kept for everything but client connections: the listener, model and log files,
# the event loop, rendezvous stores and process groups.
FD_RESERVE = 64
# Refused connections are logged at most this often (with the count since the last line).
LOG_EVERY_S = 10.0
# After a deadline the connection gets this long to flush its 408 before it is aborted.
ABORT_AFTER_S = 5.0
# How often each connection's deadlines are checked (deadlines are met to about this).
CHECK_EVERY_S = 0.5
# The label values of eagle3_connections_refused_total and eagle3_connections_timed_out_total.
REFUSAL_REASONS = ("connections", "probe_only", "body_budget")
TIMEOUT_PHASES = ("headers", "body")
# A chunked body's size line (hex size and extensions) is at most this long; longer: 400.
MAX_CHUNK_LINE = 256
_CHUNK_SIZE_LINE = re.compile(rb"[0-9A-Fa-f]{1,16}(;[^\r\n]*)?")
_DECIMAL = re.compile(r"[0-9]{1,19}")

_HANGUP = getattr(select, "POLLRDHUP", 0) | select.POLLHUP | select.POLLERR
_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
    b"Connection: close\r\nContent-Length: %d\r\n\r\n%s"
)


def raise_fd_limit() -> int:
    """Raise the soft open-file limit to the hard one where allowed; returns the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError) as exc:
            logger.warning("could not raise the open-file limit from %d to %d: %s", soft, want, exc)
    return int(soft) if soft != resource.RLIM_INFINITY else 1 << 30


def connection_cap(requested: int, fd_limit: int) -> int:
    """``--max-connections``, lowered so that the cap, the probe slots and the reserve fit ``fd_limit``."""
    return max(1, min(requested, fd_limit - FD_RESERVE - PROBE_SLOTS))


@dataclass
class _Reservation:
    nbytes: int
    released: bool = False


class ConnectionGuard:
    """Open connections against the cap, and the body-memory budget; used on the event loop only."""

    def __init__(
        self,
        *,
        max_connections: int,
        header_timeout: float,
        body_timeout: float,
        keep_alive_timeout: float,
        max_pending_body_bytes: int,
        max_body_bytes: int,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.max_connections = max_connections
        self.header_timeout = header_timeout
        self.body_timeout = body_timeout
        self.keep_alive_timeout = keep_alive_timeout
        self.max_pending_body_bytes = max_pending_body_bytes
        self.max_body_bytes = max_body_bytes
        self.max_json_body_bytes = min(protocol.MAX_JSON_BODY_BYTES, max_body_bytes)
        self.probe_only = 0  # connections beyond the cap, for probes only
        self.pending_body_bytes = 0
        self._members: set[GuardedHttpProtocol] = set()
        self._unlogged = 0
        self._last_log = -math.inf
        r = registry or CollectorRegistry()
        Gauge(
            "eagle3_open_connections", "Open client connections (probe-only ones included).", registry=r
        ).set_function(lambda: self.open + self.probe_only)
        Gauge(
            "eagle3_pending_body_bytes", "Declared bytes of request bodies being received or held.", registry=r
        ).set_function(lambda: self.pending_body_bytes)
        self.refused = Counter(
            "eagle3_connections_refused",
            "Connections and requests refused by a limit: reason is connections (the cap), probe_only "
            "(a non-probe request on a probe slot) or body_budget (--max-pending-body-bytes).",
            ["reason"],
            registry=r,
        )
        for reason in REFUSAL_REASONS:  # at 0 from the start (see eagle3_appliance.ops.metrics)
            self.refused.labels(reason)
        self.evicted = Counter(
            "eagle3_connections_evicted",
            "Idle connections closed to make room for a new one at --max-connections.",
            registry=r,
        )
        self.timed_out = Counter(
            "eagle3_connections_timed_out",
            "Connections closed at a deadline: phase is headers or body.",
            ["phase"],
            registry=r,
        )
        for phase in TIMEOUT_PHASES:
            self.timed_out.labels(phase)

    @property
    def open(self) -> int:
        """Connections that may make any request (an evicted one counts until it is gone)."""
        return len(self._members)

    def limit_to_descriptors(self, fd_limit: int) -> None:
        cap = connection_cap(self.max_connections, fd_limit)
        if cap < self.max_connections:
            logger.warning(
                "the open-file limit is %d: at most %d client connections (not --max-connections %d); "
                "raise the limit (ulimit -n) for more",
                fd_limit,
                cap,
                self.max_connections,
            )
        else:
            logger.info("open-file limit %d: up to %d client connections", fd_limit, cap)
        self.max_connections = cap

    # -- connections ------------------------------------------------------------------

    def opening(self, conn: GuardedHttpProtocol) -> str:
        """A new connection: ``"ok"``, ``"probe"`` (a probe slot) or ``"refuse"``.

        At the cap the connection idle the longest (between requests, or connected without
        sending a byte) is closed to make room; only when none is idle do probe slots and
        refusals come in.
        """
        if self.open < self.max_connections or self._evict_idle():
            self._members.add(conn)
            return "ok"
        if self.probe_only < PROBE_SLOTS:
            self.probe_only += 1
            self._note_cap("kept a probe slot")
            return "probe"
        self.refused.labels("connections").inc()
        self._note_cap("refused")
        return "refuse"

    def closed(self, conn: GuardedHttpProtocol, kind: str) -> None:
        if kind == "ok":
            self._members.discard(conn)
        elif kind == "probe":
            self.probe_only -= 1

    def _evict_idle(self) -> bool:
        idle = [(since, id(c), c) for c in self._members if (since := c.idle_since()) is not None]
        if not idle:
            return False
        _, _, victim = min(idle)
        victim.close()
        self.evicted.inc()
        self._note_cap("closed the longest-idle connection")
        return True

    def _note_cap(self, action: str) -> None:
        self._unlogged += 1
        now = time.monotonic()
        if now - self._last_log >= LOG_EVERY_S:
            logger.warning(
                "connection cap reached: %d open (--max-connections %d, plus %d for probes); %s; "
                "%d connection(s) limited since the last message",
                self.open + self.probe_only,
                self.max_connections,
                PROBE_SLOTS,
                action,
                self._unlogged,
            )
            self._last_log = now
            self._unlogged = 0

    # -- requests -------------------------------------------------------------------------

    def admit_request(self, request: Request, endpoint: str) -> None:
        """After routing and auth, before the body is read: probe slots and the body budget."""
        if request.conn_info is not None and getattr(request.conn_info.ctx, "probe_only", False):
            close_after_response(request)  # one probe per slot, then the slot is free again
            if endpoint not in PROBE_ENDPOINTS:
                self.refused.labels("probe_only").inc()
                raise Unavailable(
                    f"the server has {self.max_connections} connections open (--max-connections); "
                    "connections beyond them may only ask a health probe",
                    headers={"Retry-After": "1"},
                )
        limit = self.max_body_bytes if endpoint in protocol.WIRE_BODY_ENDPOINTS else self.max_json_body_bytes
        if isinstance(request.stream, Http):
            request.stream.request_max_size = limit  # a chunked body is cut off with 413 once past it
        nbytes = _declared_body_size(request, limit)
        if nbytes > limit:
            close_after_response(request)  # the body stays unread
            option = " (--max-body-bytes)" if limit == self.max_body_bytes else ""
            raise BodyTooLarge(f"a /{endpoint} body may be at most {limit} bytes{option}; this one declares {nbytes}")
        if nbytes == 0:
            return
        if self.pending_body_bytes + nbytes > self.max_pending_body_bytes:
            self.refused.labels("body_budget").inc()
            raise Unavailable(
                f"the server is receiving {self.pending_body_bytes} bytes of request bodies and at most "
                f"{self.max_pending_body_bytes} may be pending (--max-pending-body-bytes); retry shortly",
                headers={"Retry-After": "1"},
            )
        self.pending_body_bytes += nbytes
        reservation = _Reservation(nbytes)
        request.ctx.body_reservation = reservation
        if request.conn_info is not None:  # released if the client vanishes before a response
            request.conn_info.ctx.body_reservation = reservation

    def request_ended(self, ctx: Any) -> None:
        """The request (``request.ctx``) or its connection (``conn_info.ctx``) ended: release its body bytes."""
        reservation: _Reservation | None = getattr(ctx, "body_reservation", None)
        if reservation is not None and not reservation.released:
            reservation.released = True
            self.pending_body_bytes -= reservation.nbytes


def close_after_response(request: Request) -> None:
    """Close ``request``'s connection once it is answered (no keep-alive)."""
    if isinstance(request.stream, Http):
        request.stream.keep_alive = False


def _declared_body_size(request: Request, limit: int) -> int:
    """The body's Content-Length (a malformed one was refused with the head), or ``limit`` for a chunked body."""
    length = request.headers.get("content-length")
    if length is not None:
        return int(length)
    if request.headers.get("transfer-encoding", "").lower() == "chunked":
        return limit  # size unknown: assume the largest
    return 0


class _GuardedHttp(Http):
    """Sanic's HTTP/1.1 state machine, telling its protocol when headers start and end and when a body is in."""

    __slots__ = ()  # Sanic's metaclass gives every class slots; the protocol holds the state
    protocol: GuardedHttpProtocol

    def init_for_request(self) -> None:
        Http.init_for_request(self)
        # The control-plane limit until routing names a wire-body endpoint (ConnectionGuard.admit_request).
        self.request_max_size = self.protocol.guard.max_json_body_bytes

    async def http1_request_header(self) -> None:
        self.protocol.head_started()
        await self._check_head()
        await Http.http1_request_header(self)
        self.protocol.head_done()
        length = self.request.headers.get("content-length") if self.request is not None else None
        if length is not None and not _DECIMAL.fullmatch(length.rstrip(" \t")):  # int() takes other scripts' digits
            self.keep_alive = False
            raise BadRequest(f"Content-Length must be decimal digits, got {length[:40]!r}")

    async def _check_head(self) -> None:
        """The head's grammar (:mod:`eagle3_appliance.serving.request_head`) once it is in, before
        Sanic parses it: a head Sanic would read differently from a strict parser is refused, and
        the connection closed, so no part of it or of its body is ever taken for another request."""
        buf = self.recv_buffer
        start = 0
        while (end := buf.find(b"\r\n\r\n", start)) == -1:
            start = max(0, len(buf) - 3)
            if start >= self.HEADER_MAX_SIZE:
                return  # Sanic answers 413
            await self._receive_more()
        problem = head_problem(bytes(buf[:end])) if end < self.HEADER_MAX_SIZE else None
        if problem is not None:
            self.keep_alive = False
            raise BadRequest(f"malformed request head: {problem}")

    async def read(self) -> bytes | None:
        chunked = self.request_body == "chunked"  # type: ignore[comparison-overlap]  # Sanic stores the mode there
        if chunked and self.request_bytes_left == 0:
            await self._check_chunk_line()
        try:
            data = await Http.read(self)
        except PayloadTooLarge:  # a chunked body past the limit: name the limit (Sanic does not)
            raise PayloadTooLarge(
                f"the request body is larger than this endpoint's limit of {self.request_max_size} bytes"
            ) from None
        if not self.request_body and self.protocol.transport is not None:
            # The body is in: read the socket again (Sanic pauses above 64 KiB buffered), so a
            # client that leaves while its request waits is seen at once.
            self.protocol.transport.resume_reading()
        return data

    async def _check_chunk_line(self) -> None:
        """The next chunk's framing, before Sanic parses it: the CRLF that ends what came before, then
        a hex size with at most :data:`MAX_CHUNK_LINE` bytes of extension (Sanic skips two bytes
        unseen, accepts ``0x``/spaces in the size, and any extension that arrives in one read)."""
        buf = self.recv_buffer
        while True:
            if len(buf) >= 2 and buf[:2] != b"\r\n":
                self._bad_chunk("chunk data not followed by CRLF")
            end = buf.find(b"\r\n", 2)
            if end != -1:
                break
            if len(buf) > MAX_CHUNK_LINE + 2:
                self._bad_chunk(f"chunk size line longer than {MAX_CHUNK_LINE} bytes")
            await self._receive_more()
        line = bytes(buf[2:end])
        if len(line) > MAX_CHUNK_LINE:
            self._bad_chunk(f"chunk size line longer than {MAX_CHUNK_LINE} bytes")
        if not _CHUNK_SIZE_LINE.fullmatch(line):
            self._bad_chunk("chunk size is not hexadecimal digits")

    def _bad_chunk(self, why: str) -> NoReturn:
        self.keep_alive = False  # where this request ends is unknown: nothing after it is read
        raise BadRequest(f"malformed chunked body: {why}")


class GuardedHttpProtocol(HttpProtocol):
    """Sanic's HTTP/1.1 protocol with total header and body deadlines and the connection cap.

    Settings come from the app's :class:`ConnectionGuard` (``app.ctx.ops.connections``).
    """

    HTTP_CLASS = _GuardedHttp
    __slots__ = ("guard", "_kind", "_opened", "_requests", "_head_since", "_body_since")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.guard: ConnectionGuard = self.app.ctx.ops.connections
        self.keep_alive_timeout = self.guard.keep_alive_timeout
        self._kind = "refuse"
        self._opened = time.monotonic()
        self._requests = 0
        self._head_since: float | None = None
        self._body_since: float | None = None

    # -- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: Any) -> None:
        self._kind = self.guard.opening(self)
        if self._kind == "refuse":
            body = b'{"error": "too many connections; retry shortly", "type": "Unavailable", "status": 503}'
            transport.write(_BUSY % (len(body), body))
            transport.close()
            return
        super().connection_made(transport)
        if self._kind == "probe" and self.conn_info is not None:
            self.conn_info.ctx.probe_only = True

    def connection_lost(self, exc: Exception | None) -> None:
        kind, self._kind = self._kind, "closed"
        if kind == "refuse":
            return  # never set up
        self.guard.closed(self, kind)
        if self.conn_info is not None:
            self.guard.request_ended(self.conn_info.ctx)
        super().connection_lost(exc)

    def idle_since(self) -> float | None:
        """When this connection became idle (no request in progress), or None if it is busy or closing."""
        http = self._http if hasattr(self, "_http") else None
        if http is None or self.transport is None or self.transport.is_closing() or self._kind != "ok":
            return None
        if http.stage is not Stage.IDLE or getattr(http, "request_body", None) or self.recv_buffer:
            return None
        return self._opened if self._requests == 0 else float(self._time)

    # -- deadlines ------------------------------------------------------------------------

    def head_started(self) -> None:
        self._requests += 1
        self._head_since = time.monotonic()
        self._body_since = None

    def head_done(self) -> None:
        self._head_since = None
        self._body_since = time.monotonic()

    def check_timeouts(self) -> None:
        """Sanic's periodic check, with totals instead of time-since-last-byte for headers and bodies."""
        try:
            if not self._task or self._http is None:
                return
            http = self._http
            now = time.monotonic()
            guard = self.guard
            expired: Exception | None = None
            receiving = getattr(http, "request_body", None)  # unset before the first request
            if receiving and self._body_since is not None and now - self._body_since > guard.body_timeout:
                guard.timed_out.labels("body").inc()
                expired = RequestTimeout(f"the request body was not received within {guard.body_timeout:g} s")
                http.request_body = None  # nothing more is read: the connection closes after the 408
                http.keep_alive = False
            elif http.stage is Stage.REQUEST and self._head_since is not None:
                if now - self._head_since > self._header_timeout():
                    guard.timed_out.labels("headers").inc()
                    expired = RequestTimeout(
                        f"the request headers were not received within {self._header_timeout():g} s"
                    )
                else:
                    return self._check_later()
            elif http.stage is Stage.IDLE and not receiving:
                if self._requests == 0:
                    if now - self._opened <= self._header_timeout():
                        return self._check_later()
                    guard.timed_out.labels("headers").inc()  # connected, never sent a byte
                elif now - self._time <= self.keep_alive_timeout:
                    return self._check_later()
            elif (
                http.stage in (Stage.HANDLER, Stage.RESPONSE, Stage.FAILED) and now - self._time > self.response_timeout
            ):
                expired = ServiceUnavailable("Response Timeout")
            else:
                return self._check_later()
            if expired is not None:
                http.exception = expired
            self._task.cancel()
            self.loop.call_later(ABORT_AFTER_S, self._abort_if_open)
        except Exception:
            logger.exception("checking connection deadlines failed")

    def _header_timeout(self) -> float:
        return (
            min(self.guard.header_timeout, PROBE_HEADER_TIMEOUT_S)
            if self._kind == "probe"
            else self.guard.header_timeout
        )

    def _check_later(self) -> None:
        self._callback_check_timeouts = self.loop.call_later(CHECK_EVERY_S, self.check_timeouts)

    def _abort_if_open(self) -> None:
        if self.transport is not None and self.conn_info is not None and not self.conn_info.lost:
            self.abort()


def client_connected(request: Request) -> Callable[[], bool]:
    """Whether ``request``'s client is still connected; the callable may run on any thread.

    True until the connection is lost or the socket shows the peer's hang-up (FIN or reset),
    which the kernel reports even while unread input is pending.
    """
    conn_info = request.conn_info
    transport = request.transport
    if conn_info is None or transport is None:
        return lambda: True
    sock = transport.get_extra_info("socket")
    fd = sock.fileno() if sock is not None else -1

    def connected() -> bool:
        if conn_info.lost:
            return False
        if fd < 0:
            return True
        poller = select.poll()
        poller.register(fd, _HANGUP)
        return not any(events & _HANGUP for _, events in poller.poll(0))

    return connected
