"""A run's queue in Redis (``redis://host:port/db``, Redis >= 7): a stream with a consumer group.

The keys of run ``R`` start with ``eagle3:stream:R:``: ``run`` (a hash: the description and
counts), ``queue`` (the stream of pending and leased samples), ``refs`` / ``uris`` / ``states``
/ ``deliveries`` / ``leases`` / ``entries`` (hashes by sample id) and ``ids`` (a sorted set for
:meth:`RedisQueue.samples`' pages in sample-id order). Every operation is one Lua script
(:mod:`eagle3_client.streaming.redis_scripts`, which says how leases map onto the stream) or one
command, so it is atomic across processes and hosts.

Retries: redis-py's own are off (it would resend any command). A command that fails on the
connection is sent again only where a second copy changes nothing (``open``, ``seal``,
``state``, ``samples``, ``reclaim``, ``end``, ``ack``: a repeated ack under the lease that
acked the sample succeeds); ``acquire``, ``fail`` and ``put`` raise :class:`QueueUnreachable`
at once, as on an appliance.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from typing import Any, TypeVar, cast
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from eagle3_client.protocol import (
    LeaseJSON,
    RunDescription,
    RunStateJSON,
    SampleStatus,
    StreamRef,
    check_stream_id,
)
from eagle3_client.streaming import redis_scripts as lua
from eagle3_client.streaming.queues import (
    PUT_ACKED,
    PUT_NEW,
    PUT_REPLACED,
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

__all__ = ["KEY_PREFIX", "RedisQueue"]

KEY_PREFIX = "eagle3:stream:"
T = TypeVar("T")


def _redacted(url: str) -> str:
    """The URL without a password (for error messages)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


class RedisQueue(QueueBackend):
    """One run's queue in the Redis at ``url`` (``redis://[:password@]host:port/db``)."""

    def __init__(
        self,
        url: str,
        run_id: str,
        *,
        connect_timeout: float = 5.0,
        timeout: float = 30.0,
        retries: int = 3,
        backoff_s: float = 0.5,
    ) -> None:
        if not url.startswith(("redis://", "rediss://")):
            raise ValueError(f"a Redis queue URL is redis://host:port/db, got {_redacted(url)!r}")
        self.url = url
        self.run_id = check_stream_id(run_id, "the run id")
        self._shown = _redacted(url)
        self._retries = retries
        self._backoff_s = backoff_s
        self._redis = redis.Redis.from_url(
            url,
            decode_responses=True,
            socket_connect_timeout=connect_timeout,
            socket_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
        )
        prefix = f"{KEY_PREFIX}{self.run_id}:"
        self._keys = [prefix + k for k in lua.KEYS]
        self._scripts = {
            name: self._redis.register_script(source)
            for name, source in {
                "open": lua.OPEN,
                "put": lua.PUT,
                "acquire": lua.ACQUIRE,
                "ack": lua.ACK,
                "fail": lua.FAIL,
                "reclaim": lua.RECLAIM,
                "seal": lua.SEAL,
                "samples": lua.SAMPLES,
            }.items()
        }

    # -- the contract ---------------------------------------------------------------------------

    def open(self, description: RunDescription | None = None) -> RunDescription:
        if description is None:
            args = ["", "", "", "", ""]
        else:
            timeout = description.visibility_timeout_s
            body = json.dumps(description.to_json())
            args = [body, description.model_fingerprint, str(math.ceil(timeout * 1000)), repr(timeout), "create"]
        reply = self._script("open", args)
        stored = RunDescription.from_json(json.loads(reply[1]))
        if description is not None and (diffs := stored.differences(description)):
            raise RunMismatch(
                f"run {self.run_id!r} exists in {self._shown} with another description: {'; '.join(diffs)}"
            )
        return stored

    def put(self, ref: StreamRef) -> str:
        check_stream_id(ref.sample_id, "the sample id")
        body = json.dumps(ref.to_json())
        args = [ref.sample_id, body, ref.store_uri, ref.run_id, ref.target_model_version, self.run_id, ""]
        reply = self._script("put", args)
        if reply[0] == "other_run":
            raise RunMismatch(f"sample {ref.sample_id!r} is of run {ref.run_id!r}, not of {self.run_id!r}")
        if reply[0] == "other_model":
            raise RunMismatch(
                f"sample {ref.sample_id!r} was computed by model {ref.target_model_version!r}; "
                f"run {self.run_id!r} is of model {reply[1]!r}"
            )
        if reply[0] == "sealed":
            raise RunMismatch(
                f"run {self.run_id!r} is sealed at {reply[1]} samples; {ref.sample_id!r} is not one of them"
            )
        assert reply[0] in (PUT_NEW, PUT_REPLACED, PUT_ACKED), reply
        return str(reply[0])

    def acquire(self, consumer: str) -> LeaseJSON | None:
        reply = self._script("acquire", [check_stream_id(consumer, "the consumer name"), ""])
        if reply[0] == "none":
            return None
        ref = StreamRef.from_json(json.loads(reply[1]))
        return LeaseJSON(ref, str(reply[2]), float(reply[4]), int(reply[3]))

    def ack(self, sample_id: str, lease_id: str) -> None:
        self._held("ack", sample_id, lease_id)

    def fail(self, sample_id: str, lease_id: str) -> None:
        self._held("fail", sample_id, lease_id)

    def reclaim_expired(self) -> int:
        return int(self._script("reclaim", [""])[1])

    def seal(self, total: int) -> None:
        check_total(total)
        reply = self._script("seal", [str(total), ""])
        if reply[0] == "sealed":
            raise RunMismatch(f"run {self.run_id!r} is sealed at {reply[1]} samples, not {total}")
        if reply[0] == "too_many":
            raise RunMismatch(f"run {self.run_id!r} already has {reply[1]} samples, more than {total}")

    def state(self) -> RunStateJSON:
        run = cast("dict[str, str]", self._retry("state", lambda: self._redis.hgetall(self._keys[0])))
        if not run:
            raise self._unknown_run()
        total = int(run["total"]) if run.get("sealed") == "1" else None
        acked = int(run["acked"])
        return RunStateJSON(
            run_id=self.run_id,
            description=RunDescription.from_json(json.loads(run["description"])),
            sealed=total is not None,
            total=total,
            known=int(run["known"]),
            pending=int(run["pending"]),
            leased=int(run["leased"]),
            acked=acked,
            redelivered=int(run["redelivered"]),
            recomputed=int(run["recomputed"]),
            closed=total is not None and acked == total,
        )

    def samples(self, after: str | None = None, limit: int = 1000) -> list[SampleStatus]:
        check_page(limit)
        start = "" if after is None else check_stream_id(after, "'after'")
        _, ids, states, uris = self._script("samples", [start, str(limit), ""])
        return [SampleStatus(s, state, uri) for s, state, uri in zip(ids, states, uris, strict=True)]

    def end(self) -> None:
        self._retry("end", lambda: self._redis.delete(*self._keys))

    def close(self) -> None:
        self._redis.close()

    # -- helpers --------------------------------------------------------------------------------

    def _held(self, op: str, sample_id: str, lease_id: str) -> None:
        args = [check_stream_id(sample_id, "the sample id"), check_stream_id(lease_id, "the lease id"), ""]
        reply = self._script(op, args)
        if reply[0] == "unknown_sample":
            raise UnknownSample(f"run {self.run_id!r} in {self._shown} has no sample {sample_id!r}")
        if reply[0] == "not_held":
            state = reply[1]
            now = f"{state} under another lease" if state != "pending" else "pending (its lease was returned)"
            raise LeaseNotHeld(
                f"sample {sample_id!r} of run {self.run_id!r} is not held under lease {lease_id!r}: it is {now}; "
                "an expired lease may have been handed on"
            )

    def _script(self, op: str, args: list[str]) -> list[Any]:
        script = self._scripts[op]
        reply: list[Any] = self._retry(op, lambda: script(keys=self._keys, args=args))
        if reply[0] == "unknown_run":
            raise self._unknown_run()
        return reply

    def _retry(self, op: str, call: Callable[[], T]) -> T:
        attempts = self._retries + 1 if op in _IDEMPOTENT else 1
        for attempt in range(attempts):
            try:
                return call()
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                if attempt == attempts - 1:
                    raise QueueUnreachable(
                        f"queue {self._shown} did not answer {op} on run {self.run_id!r}: {type(exc).__name__}: {exc}"
                    ) from exc
                time.sleep(self._backoff_s * 2**attempt)
            except redis.ResponseError as exc:
                raise StreamError(f"queue {self._shown} refused {op} on run {self.run_id!r}: {exc}") from exc
        raise AssertionError("unreachable")

    def _unknown_run(self) -> UnknownRun:
        return UnknownRun(f"run {self.run_id!r} has no queue in {self._shown}; a producer creates it with open")


# Operations whose second copy changes nothing (see the module docstring).
_IDEMPOTENT = frozenset({"open", "seal", "state", "samples", "reclaim", "end", "ack"})
