"""``POST /queue/<run>/<op>``: the run queues this appliance hosts (:mod:`eagle3_appliance.stream.queue`).

Any process may call them (a producer, each trainer): no client session is needed, but the
server's bearer token applies as to every route (checked before the body is read). Bodies are
small JSON objects; each is decoded here and handed to :class:`~eagle3_appliance.stream.queue.RunQueues`,
whose refusals carry their status (404 unknown run or sample, 409 mismatch or lease not held).
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Mapping
from typing import Any

from sanic import Blueprint, Request
from sanic.response import HTTPResponse, json

from eagle3_appliance.errors import InvalidRequest
from eagle3_appliance.ops.metrics import Metrics
from eagle3_appliance.serving.state import serving_state
from eagle3_appliance.serving.validation import json_body, json_object
from eagle3_appliance.stream.queue import EVENTS, STATES, QueueObserver, RunQueues
from eagle3_client import protocol
from eagle3_client.protocol import RunDescription, StreamRef, check_stream_id
from eagle3_client.quoting import quote

__all__ = ["MetricsObserver", "blueprint"]

blueprint = Blueprint("queues")


class MetricsObserver(QueueObserver):
    """The queues' counts and events as ``eagle3_stream_queue_*`` series, one set per hosted run."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def counts(self, run_id: str, pending: int, leased: int, acked: int) -> None:
        for state, n in zip(STATES, (pending, leased, acked), strict=True):
            self._metrics.stream_queue.labels(run_id, state).set(n)

    def event(self, run_id: str, event: str) -> None:
        self._metrics.stream_queue_events.labels(run_id, event).inc()

    def ended(self, run_id: str) -> None:
        for metric, values in ((self._metrics.stream_queue, STATES), (self._metrics.stream_queue_events, EVENTS)):
            for value in values:
                try:
                    metric.remove(run_id, value)
                except KeyError:  # a series never set (no such event yet)
                    pass


def _ids(body: Mapping[str, Any]) -> tuple[str, str]:
    try:
        sample_id = check_stream_id(body.get("sample_id"), "'sample_id'")
        return sample_id, check_stream_id(body.get("lease_id"), "'lease_id'")
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None


def _description(body: Mapping[str, Any]) -> RunDescription | None:
    value = body.get("description")
    return None if value is None else RunDescription.from_json(value)


def _integer(body: Mapping[str, Any], key: str, default: int | None = None) -> int:
    value = body.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise InvalidRequest(f"{key!r} must be an integer >= 0, got {quote(value)}")
    return value


def _open(queues: RunQueues, run_id: str, body: bytes) -> dict[str, Any]:
    description = json_body(body, _description)
    return {"description": queues.open(run_id, description).to_json()}


def _put(queues: RunQueues, run_id: str, body: bytes) -> dict[str, Any]:
    ref = json_body(body, lambda b: StreamRef.from_json(b.get("ref")))
    return {"result": queues.put(run_id, ref)}


def _acquire(queues: RunQueues, run_id: str, body: bytes) -> dict[str, Any]:
    consumer = json_body(body, lambda b: check_stream_id(b.get("consumer"), "'consumer'"))
    lease, closed = queues.acquire(run_id, consumer)
    return {"lease": lease.to_json() if lease else None, "closed": closed}


def _ack(queues: RunQueues, run_id: str, body: bytes) -> dict[str, Any]:
    queues.ack(run_id, *_ids(json_object(body)))
    return {"status": "ok"}


def _fail(queues: RunQueues, run_id: str, body: bytes) -> dict[str, Any]:
    queues.fail(run_id, *_ids(json_object(body)))
    return {"status": "ok"}


def _reclaim(queues: RunQueues, run_id: str, body: bytes) -> dict[str, Any]:
    json_object(body)  # {} (anything but a JSON object is a malformed request)
    return {"reclaimed": queues.reclaim(run_id)}


def _seal(queues: RunQueues, run_id: str, body: bytes) -> dict[str, Any]:
    queues.seal(run_id, _integer(json_object(body), "total"))
    return {"status": "ok"}


def _state(queues: RunQueues, run_id: str, body: bytes) -> dict[str, Any]:
    json_object(body)
    return queues.state(run_id).to_json()


def _samples(queues: RunQueues, run_id: str, body: bytes) -> dict[str, Any]:
    fields = json_object(body)
    after = fields.get("after")
    if after is not None:
        try:
            check_stream_id(after, "'after'")
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from None
    limit = _integer(fields, "limit", 1000)  # at most MAX_STREAM_IDS_PER_REQUEST: RunQueues checks it
    return {"samples": [s.to_json() for s in queues.samples(run_id, after, limit)]}


def _end(queues: RunQueues, run_id: str, body: bytes) -> dict[str, Any]:
    json_object(body)
    queues.end(run_id)
    return {"status": "ok"}


_OPS: dict[str, Callable[[RunQueues, str, bytes], dict[str, Any]]] = {
    "open": _open,
    "put": _put,
    "acquire": _acquire,
    "ack": _ack,
    "fail": _fail,
    "reclaim": _reclaim,
    "seal": _seal,
    "state": _state,
    "samples": _samples,
    "end": _end,
}
assert set(_OPS) == set(protocol.QUEUE_OPS), "every queue operation has a handler"


def _route(op: str) -> Callable[[Request, str], Coroutine[Any, Any, HTTPResponse]]:
    handle = _OPS[op]

    async def queue_op(request: Request, run_id: str) -> HTTPResponse:
        try:
            check_stream_id(run_id, "the run id")
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from None
        return json(handle(serving_state(request).queues, run_id, request.body))

    queue_op.__name__ = f"queue_{op}"
    return queue_op


for _op in protocol.QUEUE_OPS:
    blueprint.add_route(_route(_op), f"/{protocol.EP_QUEUE}/<run_id:str>/{_op}", methods=["POST"])
