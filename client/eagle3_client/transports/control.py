"""HTTP control plane to one target server: keep-alive httpx, retries, error mapping.

Retries follow upstream's rule: only connection errors and timeouts are retried (with
exponential back-off, 1 s, 2 s, 4 s by default), never an HTTP error status, because the
server would answer the same again. A 503 is the one exception: it means "busy, come back",
and its ``Retry-After`` is honoured up to ``max_retries`` times.

``/generate`` on our servers (a session is registered) waits in the server's queue rather
than abandoning it: the wait for the answer is the server's ``--request-timeout`` plus
:data:`GENERATE_TIMEOUT_MARGIN_S` (the server answers 200, or 503 with ``Retry-After``, by
then), unless ``generate_timeout`` says otherwise; and every attempt of one call carries the
same ``X-Eagle3-Request-Id``, so a retry after a timeout or a lost connection attaches to the
computation the server already has instead of queueing a second forward (after a read timeout
the retry is sent at once, without back-off, to keep the request's place). Such a timed-out
``/generate`` is retried up to ``max_retries`` times even where the caller turned retries off
(a fleet, which fails over instead): the server has it, another would compute it again. With
the derived wait it is not: the server answers by its own limit, so silence past it plus the
margin means a frozen or lost server, and the whole default wait stays one ``generate_wait()``.
A ``503`` that names the server's time limit (``X-Eagle3-Time-Limit``) is retried the same way,
at once under the same id, ``max_retries`` times, then raised as ``TargetTimeLimit``.

:meth:`ControlPlane.abort` abandons the requests in flight (a heartbeat got no answer: the
fleet moves them to a ready server, :meth:`eagle3_client.remote.fleet.Fleet.suspect`).
Against an upstream server neither applies: ``timeout`` bounds each read and no extra header
is sent.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import httpx
import orjson
import torch

from eagle3_client import protocol, wire
from eagle3_client.errors import (
    ProtocolViolation,
    TargetHTTPError,
    TargetOverloaded,
    TargetTimeLimit,
    TargetTimeout,
    TargetUnreachable,
)
from eagle3_client.transports.buffers import BufferPool
from eagle3_client.transports.socketbody import BODY, RECV_INTO, SocketTransport
from eagle3_client.transports.tls import tls_context

__all__ = ["GENERATE_TIMEOUT_MARGIN_S", "ControlPlane"]

logger = logging.getLogger(__name__)

# Errors after which the same request may be sent again: the server never saw it, or it
# went away before answering. Not retried: LocalProtocolError, UnsupportedProtocol (bugs).
_RETRYABLE = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)
_MAX_RETRY_AFTER_S = 30.0
# Added to a server's --request-timeout for the /generate wait: queueing on the event loop,
# the first byte of a large answer, clocks.
GENERATE_TIMEOUT_MARGIN_S = 30.0
# What ControlPlane.abort() still sends: enough to probe the server and register a new session.
_SENT_WHILE_ABORTED = frozenset(
    {protocol.EP_HEALTH_READY, protocol.EP_HEALTH, protocol.EP_SESSION, protocol.EP_DISCONNECT}
)


T = TypeVar("T")


class ControlPlane:
    """One server's HTTP connection.

    **Parameters:**

    * ``url`` - the server's base URL, e.g. ``http://node3:8001``.
    * ``timeout`` - seconds for connect, each read and each write.
    * ``generate_timeout`` - seconds to wait for a ``/generate`` answer; None derives it
      from the server's ``--request-timeout`` (see the module docstring).
    * ``max_retries`` - extra attempts after a connection error, timeout or 503.
    * ``backoff`` - first back-off in seconds, doubled after each attempt.
    * ``headers`` - sent with every request (e.g. ``Authorization``).
    * ``transport`` - an ``httpx.BaseTransport`` to use instead of the network (tests).
    * ``buffer_pool`` - where wire answers' tensors are allocated (reused memory, see
      :mod:`eagle3_client.transports.buffers`); None allocates fresh tensors.

    Wire answers are received by a :class:`eagle3_client.transports.socketbody.SocketTransport` straight
    into the tensors (``recv_into``); other requests use httpx's own transport.
    """

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 120.0,
        generate_timeout: float | None = None,
        max_retries: int = 3,
        backoff: float = 1.0,
        headers: Mapping[str, str] | None = None,
        transport: httpx.BaseTransport | None = None,
        buffer_pool: BufferPool | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.buffer_pool = buffer_pool
        limits = httpx.Limits(max_connections=4, max_keepalive_connections=4)
        if transport is None:
            transport = SocketTransport(httpx.HTTPTransport(limits=limits, trust_env=False, verify=tls_context()))
        self._transport = transport
        # Set by abort() (a server that stopped answering): why requests are refused until resume().
        self._aborted: str | None = None
        self._abort_epoch = 0  # abort() calls so far: a request in flight across one is abandoned
        self.max_retries = max_retries
        self.backoff = backoff
        self.timeout = timeout
        self.generate_timeout = generate_timeout
        # Our server's --request-timeout, from its session reply (None: upstream, or not told).
        self.server_request_timeout: float | None = None
        # trust_env=False: a target server is a direct in-cluster peer; an ambient
        # http_proxy would only get in the way (and NO_PROXY would need every node name).
        self._http = httpx.Client(
            base_url=self.url,
            timeout=timeout,
            trust_env=False,
            headers=dict(headers or {}),
            limits=limits,
            transport=transport,
        )

    def _derived_wait(self) -> bool:
        """Whether ``generate_wait()`` is derived from the server's own time limit (no ``generate_timeout``)."""
        return self.generate_timeout is None and self.server_request_timeout is not None

    def generate_wait(self) -> float:
        """Seconds to wait for a ``/generate`` answer (see the module docstring)."""
        if self.generate_timeout is not None:
            return self.generate_timeout
        if self.server_request_timeout is not None:
            return max(self.timeout, self.server_request_timeout + GENERATE_TIMEOUT_MARGIN_S)
        return self.timeout

    def abort(self, reason: str) -> None:
        """Abandon every request in flight to this server now, and refuse new ones until :meth:`resume`.

        For a server that stopped answering (its heartbeat failed): a thread blocked on its
        answer gets :class:`TargetUnreachable` at once instead of after ``generate_wait()``.
        Only the readiness probes, ``/session`` and ``/disconnect`` are still sent, so that the
        server can be probed and taken back. Waits on the socket transport (every wire
        answer, and the HTTP answer of each group-plane ``/generate``) are cut off at once; a
        request on httpx's own transport is abandoned at its next retry, and a group transfer
        or join already under way ends within ``data_plane_timeout`` / ``data_plane_connect_timeout``.
        """
        self._aborted = reason
        self._abort_epoch += 1
        if isinstance(self._transport, SocketTransport):
            self._transport.abort()

    def resume(self) -> None:
        """Send requests again (a new session is being registered)."""
        self._aborted = None

    def set_header(self, name: str, value: str | None) -> None:
        """Send (or, with None, stop sending) a header on every later request."""
        if value is None:
            self._http.headers.pop(name, None)
        else:
            self._http.headers[name] = value

    # -- requests ---------------------------------------------------------------------

    def post_json(self, endpoint: str, body: Any = None, *, retries: bool = True) -> Any:
        """POST a JSON body (or an empty one) and parse the JSON answer."""
        content = b"" if body is None else orjson.dumps(body)
        content_type = protocol.JSON if body is not None else protocol.OCTET_STREAM
        return self.request(
            "POST", endpoint, self.read_json, content=content, content_type=content_type, retries=retries
        )

    def get_json(self, endpoint: str) -> Any:
        return self.request("GET", endpoint, self.read_json)

    def post_wire(
        self, endpoint: str, content: bytes = b"", *, headers: Mapping[str, str] | None = None
    ) -> dict[str, torch.Tensor | None]:
        """POST a wire blob (or nothing) and decode a wire-blob answer as it streams in."""
        return self.request(
            "POST", endpoint, self.read_wire, content=content, headers=headers, extensions={RECV_INTO: True}
        )

    def read_wire(self, resp: httpx.Response) -> dict[str, torch.Tensor | None]:
        """Decode a streaming wire body straight into per-tensor storage (no whole-body buffer)."""
        length = resp.headers.get("content-length")
        alloc = self.buffer_pool.empty if self.buffer_pool is not None else None
        reader = wire.WireReader(expected_size=int(length) if length is not None else None, alloc=alloc)
        try:
            body = resp.extensions.get(BODY)
            if body is not None:  # SocketTransport: the socket receives into the tensors
                return reader.read_from(body.readinto)
            for chunk in resp.iter_bytes():
                reader.feed(chunk)
            return reader.finish()
        except wire.WireFormatError as exc:
            raise ProtocolViolation(f"{resp.request.url}: malformed wire body: {exc}") from None

    def request(
        self,
        method: str,
        endpoint: str,
        handle: Callable[[httpx.Response], T],
        *,
        content: bytes = b"",
        content_type: str = protocol.OCTET_STREAM,
        headers: Mapping[str, str] | None = None,
        retries: bool = True,
        timeout: float | None = None,
        retry_lost: bool = True,
        extensions: dict[str, Any] | None = None,
    ) -> T:
        """Send one request, let ``handle`` read the 200 response, retry per the module rules.

        ``handle`` runs inside the attempt, so a connection that breaks while the body is
        still streaming in is retried like one that broke before the answer: the whole
        request is sent again (the server's answers are idempotent). ``retries=False`` sends it
        once, except a ``/generate`` that timed out (see the module docstring).
        ``retry_lost=False`` keeps the 503 retries but not those of a lost connection or a
        timeout, after which the server may have acted (a process-group transfer must not be
        started twice).
        """
        url = self.url + protocol.path(endpoint)
        epoch = self._abort_epoch
        if self._aborted is not None and endpoint not in _SENT_WHILE_ABORTED:
            raise TargetUnreachable(f"{method} {url} not sent: {self._aborted}")
        attempts = 1 + self.max_retries
        req_headers = dict(headers or {})
        request_timeout = self._http.timeout if timeout is None else httpx.Timeout(timeout)
        if endpoint == protocol.EP_GENERATE:
            if timeout is None:
                request_timeout = httpx.Timeout(self.timeout, read=self.generate_wait())
            if protocol.SESSION_HEADER in self._http.headers:  # our server: it understands request ids
                req_headers.setdefault(protocol.REQUEST_ID_HEADER, secrets.token_hex(12))
        if method == "POST":
            req_headers.setdefault("Content-Type", content_type)
        last: Exception | None = None
        for attempt in range(attempts):
            try:
                with self._http.stream(
                    method, url, content=content, headers=req_headers, extensions=extensions, timeout=request_timeout
                ) as resp:
                    if resp.status_code == 503:
                        resp.read()
                        delay = _retry_after(resp)
                        if protocol.TIME_LIMIT_HEADER in resp.headers:  # alive, and computing it still
                            last = TargetTimeLimit(url, 503, _server_message(resp), attempt + 1)
                            if protocol.REQUEST_ID_HEADER not in req_headers or not retry_lost:
                                attempts = attempt + 1
                                break  # a retry could not join the computation: it would compute again
                            delay = 0.0  # join it at once, before it finishes with nobody waiting
                        else:
                            last = TargetOverloaded(url, 503, _server_message(resp))
                            if not retries:
                                attempts = attempt + 1
                                break
                    elif resp.status_code != 200:
                        resp.read()
                        raise TargetHTTPError(url, resp.status_code, _server_message(resp))
                    else:
                        return handle(resp)
            except _RETRYABLE as exc:
                last, delay = exc, None
                if self._abort_epoch != epoch:  # abort(): the server stopped answering
                    raise TargetUnreachable(f"{method} {url} abandoned: {self._aborted or 'aborted'}") from exc
                if isinstance(exc, httpx.ReadTimeout) and protocol.REQUEST_ID_HEADER in req_headers and retry_lost:
                    if endpoint == protocol.EP_GENERATE and timeout is None and self._derived_wait():
                        # The server answers by its own time limit (200 or 503) and this wait is that plus a
                        # margin: silent past it, the server is frozen or gone, not computing. Not resent,
                        # so that the default wait is one generate_wait() (the caller probes it).
                        attempts = attempt + 1
                        break
                    # The server has the request and is computing it: resend at once to attach to it
                    # (after a pause it might finish with nobody waiting, and compute it again). A
                    # fleet retries this too: another server would compute it a second time.
                    delay = 0.0
                elif not retries or not retry_lost:
                    attempts = attempt + 1
                    break
            if attempt + 1 < attempts:
                delay = self.backoff * 2**attempt if delay is None else delay
                logger.warning("%s %s: %s; retrying in %.1f s", method, url, last, delay)
                time.sleep(delay)
        if isinstance(last, TargetOverloaded):
            raise last
        kind = TargetTimeout if isinstance(last, httpx.TimeoutException) else TargetUnreachable
        raise kind(f"{method} {url} failed after {attempts} attempt(s): {type(last).__name__}: {last}") from last

    @staticmethod
    def read_json(resp: httpx.Response) -> Any:
        body = resp.read()
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise ProtocolViolation(f"{resp.request.url}: expected JSON, got {body[:200]!r}") from exc

    def close(self) -> None:
        self._http.close()


def _retry_after(resp: httpx.Response) -> float | None:
    value = resp.headers.get("retry-after")
    try:
        return min(float(value), _MAX_RETRY_AFTER_S) if value is not None else None
    except ValueError:
        return None


def _server_message(resp: httpx.Response) -> str:
    """The server's error text: our appliance's ``{"error": ...}``, else the raw body."""
    body = resp.content
    try:
        parsed = orjson.loads(body)
        if isinstance(parsed, dict) and "error" in parsed:
            return str(parsed["error"])
    except orjson.JSONDecodeError:
        pass
    return body[:500].decode("utf-8", "replace") or resp.reason_phrase
