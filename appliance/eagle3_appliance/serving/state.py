"""What the request handlers share, and how a handler finds it and its caller's session."""

from __future__ import annotations

from dataclasses import dataclass, field

from sanic import Request

from eagle3_appliance.core.sessions import Session, SessionRegistry
from eagle3_appliance.dataplanes.buffers import ServerBuffers
from eagle3_appliance.dataplanes.group_plane import DataPlaneServer
from eagle3_appliance.model.target import Target
from eagle3_appliance.serving.pipeline import Pipeline
from eagle3_appliance.settings import Settings
from eagle3_appliance.stream.queue import RunQueues
from eagle3_client import protocol

__all__ = ["ServingState", "request_session", "serving_state"]


@dataclass
class ServingState:
    """The model, the ``/generate`` pipeline, the sessions, the data planes; lives on ``app.ctx.state``."""

    settings: Settings
    target: Target
    sessions: SessionRegistry
    buffers: ServerBuffers
    planes: DataPlaneServer
    pipeline: Pipeline
    queues: RunQueues = field(default_factory=RunQueues)  # the run queues hosted here (/queue/<run>/<op>)


def serving_state(request: Request) -> ServingState:
    state: ServingState = request.app.ctx.state
    return state


def request_session(request: Request) -> Session:
    """The caller's session (``X-Eagle3-Session``; none = the anonymous one); 410 if it is gone."""
    return serving_state(request).sessions.get(request.headers.get(protocol.SESSION_HEADER))
