"""The stream endpoints: ``/stream/produce``, ``/stream/release`` and ``/stream/runs``.

What they do is :meth:`eagle3_appliance.serving.pipeline.Pipeline.produce` and
:class:`eagle3_appliance.stream.resident.ResidentAnswers`; a claim of a kept answer is a
``/generate`` (:meth:`~eagle3_appliance.serving.pipeline.Pipeline.generate`). Releases and the
run listings need no session: the trainers' queues and the producer call them.
"""

from __future__ import annotations

from sanic import Blueprint, Request
from sanic.response import HTTPResponse, json

from eagle3_appliance.errors import InvalidRequest
from eagle3_appliance.serving.state import request_session, serving_state
from eagle3_appliance.serving.validation import json_body
from eagle3_client import protocol
from eagle3_client.protocol import ReleaseRequest

__all__ = ["blueprint"]

blueprint = Blueprint("stream")


@blueprint.post(protocol.path(protocol.EP_STREAM_PRODUCE))
async def produce(request: Request) -> HTTPResponse:
    """Compute one sample's answer and keep it here; its reference (StreamRef JSON)."""
    state = serving_state(request)
    ref = await state.pipeline.produce(request, request_session(request))
    return json(ref.to_json())


@blueprint.post(protocol.path(protocol.EP_STREAM_RELEASE))
async def release(request: Request) -> HTTPResponse:
    wanted = json_body(request.body, ReleaseRequest.from_json)
    released = serving_state(request).pipeline.resident.release(wanted.run_id, list(wanted.sample_ids))
    return json({"released": released})


@blueprint.get(protocol.path(protocol.EP_STREAM_RUNS))
async def runs(request: Request) -> HTTPResponse:
    return json(serving_state(request).pipeline.resident.describe())


@blueprint.get(protocol.path(protocol.EP_STREAM_RUNS) + "/<run_id:str>")
async def run_samples(request: Request, run_id: str) -> HTTPResponse:
    run_id = _run_id(run_id)
    return json({"run_id": run_id, "samples": serving_state(request).pipeline.resident.samples(run_id)})


@blueprint.delete(protocol.path(protocol.EP_STREAM_RUNS) + "/<run_id:str>")
async def end_run(request: Request, run_id: str) -> HTTPResponse:
    return json({"run_id": run_id, "dropped": serving_state(request).pipeline.resident.end_run(_run_id(run_id))})


def _run_id(value: str) -> str:
    try:
        return protocol.check_stream_id(value, "the run id")
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None
