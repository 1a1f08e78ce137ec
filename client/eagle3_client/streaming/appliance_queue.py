"""A run's queue hosted by an appliance (``appliance://host:port``): ``POST /queue/<run>/<op>`` over httpx.

Retries: a request that never reached the server (the connection was refused or could not be
made in time) is sent again whatever it is, with back-off. A request that may have reached it
(a read timeout, a connection lost mid-answer) is sent again only where a second copy changes
nothing: ``open``, ``seal``, ``state``, ``samples``, ``reclaim``, ``end`` and ``ack`` (the host
answers a repeated ack under the lease that acked the sample as a success). Not ``acquire``
(a second lease would be handed out; the first one's sample comes back when it expires),
``fail`` (its repeat would find the sample pending and raise :class:`LeaseNotHeld`), nor
``put`` (its repeat would read ``replaced`` for a sample the first copy queued).

Errors: the host's JSON error body names its class (``"type"``), which is the contract's
error class name (404 :class:`UnknownRun` / :class:`UnknownSample`, 409 :class:`RunMismatch` /
:class:`LeaseNotHeld`); a host that cannot be reached is :class:`QueueUnreachable`, naming the URL.
"""

from __future__ import annotations

import time
from typing import Any

import httpx

from eagle3_client.auth import auth_headers
from eagle3_client.protocol import (
    LeaseJSON,
    RunDescription,
    RunStateJSON,
    SampleStatus,
    StreamRef,
    check_stream_id,
    queue_path,
)
from eagle3_client.streaming.queues import (
    LeaseNotHeld,
    QueueBackend,
    QueueUnreachable,
    RunMismatch,
    StreamError,
    UnknownRun,
    UnknownSample,
    check_page,
    check_total,
)
from eagle3_client.transports.tls import tls_context

__all__ = ["SCHEME", "ApplianceQueue", "http_url"]

SCHEME = "appliance://"
# Operations whose second copy changes nothing (see the module docstring).
IDEMPOTENT = frozenset({"open", "seal", "state", "samples", "reclaim", "end", "ack"})
_ERRORS: dict[str, type[StreamError]] = {
    cls.__name__: cls for cls in (UnknownRun, UnknownSample, RunMismatch, LeaseNotHeld)
}
# Never sent: safe to repeat for any operation.
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout)
# Maybe sent: repeated only for IDEMPOTENT operations.
_MAYBE_SENT = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)


def http_url(url: str) -> str:
    """``appliance://host:port`` -> ``http://host:port`` (ValueError for another scheme)."""
    if not url.startswith(SCHEME) or not url[len(SCHEME) :].strip("/"):
        raise ValueError(f"an appliance queue URL is appliance://host:port, got {url!r}")
    return "http://" + url[len(SCHEME) :].rstrip("/")


class ApplianceQueue(QueueBackend):
    """One run's queue on the appliance at ``url`` (``appliance://host:port``)."""

    def __init__(
        self,
        url: str,
        run_id: str,
        *,
        auth_token: str | None = None,
        connect_timeout: float = 5.0,
        timeout: float = 30.0,
        retries: int = 3,
        backoff_s: float = 0.5,
    ) -> None:
        self.url = url
        self.run_id = check_stream_id(run_id, "the run id")
        self._base = http_url(url)
        self._retries = retries
        self._backoff_s = backoff_s
        self._http = httpx.Client(
            base_url=self._base,
            headers=auth_headers(auth_token),
            timeout=httpx.Timeout(timeout, connect=connect_timeout),
            trust_env=False,
            verify=tls_context(),
        )

    def open(self, description: RunDescription | None = None) -> RunDescription:
        body = {"description": description.to_json() if description else None}
        return RunDescription.from_json(self._call("open", body)["description"])

    def put(self, ref: StreamRef) -> str:
        return str(self._call("put", {"ref": ref.to_json()})["result"])

    def acquire(self, consumer: str) -> LeaseJSON | None:
        lease = self._call("acquire", {"consumer": check_stream_id(consumer, "the consumer name")})["lease"]
        return None if lease is None else LeaseJSON.from_json(lease)

    def ack(self, sample_id: str, lease_id: str) -> None:
        self._call("ack", _held(sample_id, lease_id))

    def fail(self, sample_id: str, lease_id: str) -> None:
        self._call("fail", _held(sample_id, lease_id))

    def reclaim_expired(self) -> int:
        return int(self._call("reclaim", {})["reclaimed"])

    def seal(self, total: int) -> None:
        check_total(total)
        self._call("seal", {"total": total})

    def state(self) -> RunStateJSON:
        return RunStateJSON.from_json(self._call("state", {}))

    def samples(self, after: str | None = None, limit: int = 1000) -> list[SampleStatus]:
        check_page(limit)
        if after is not None:
            check_stream_id(after, "'after'")
        page = self._call("samples", {"after": after, "limit": limit})["samples"]
        return [SampleStatus.from_json(s) for s in page]

    def end(self) -> None:
        self._call("end", {})

    def close(self) -> None:
        self._http.close()

    def _call(self, op: str, body: dict[str, Any]) -> dict[str, Any]:
        path = "/" + queue_path(self.run_id, op)
        for attempt in range(self._retries + 1):
            try:
                response = self._http.post(path, json=body)
                break
            except (*_NOT_SENT, *_MAYBE_SENT) as exc:
                may_repeat = isinstance(exc, _NOT_SENT) or op in IDEMPOTENT
                if not may_repeat or attempt == self._retries:
                    raise QueueUnreachable(
                        f"queue {self.url} ({self._base}) did not answer {op} on run {self.run_id!r}: "
                        f"{type(exc).__name__}: {exc}"
                    ) from exc
                time.sleep(self._backoff_s * 2**attempt)
        if response.status_code != 200:
            raise self._error(op, response)
        parsed = response.json()
        if not isinstance(parsed, dict):
            raise StreamError(f"queue {self.url} answered {op} with {type(parsed).__name__}, not a JSON object")
        return parsed

    def _error(self, op: str, response: httpx.Response) -> StreamError:
        try:
            body = response.json()
        except ValueError:
            body = {}
        body = body if isinstance(body, dict) else {}
        message = str(body.get("error") or response.text[:500])
        kind = _ERRORS.get(str(body.get("type")), StreamError)
        return kind(f"queue {self.url} refused {op} (HTTP {response.status_code}): {message}")


def _held(sample_id: str, lease_id: str) -> dict[str, str]:
    sample_id = check_stream_id(sample_id, "the sample id")
    return {"sample_id": sample_id, "lease_id": check_stream_id(lease_id, "the lease id")}
