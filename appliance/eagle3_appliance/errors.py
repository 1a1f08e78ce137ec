"""The appliance's error family and the one handler that turns any error into JSON.

Status codes (an upstream client only checks for non-200, so every 4xx is compatible):

* 400 ``MalformedBody``     the body is not a valid wire blob / JSON
* 401 ``Unauthorized``      missing or wrong bearer token
* 404 / 405                 unknown path / method (Sanic's own errors, reshaped here);
  ``NotFound``: a named thing (a stream's run or sample) this server does not have
* 409 ``NotConfigured``     ``/generate`` before ``/set_vocab_mapping``; ``Conflict``: the request
  contradicts what the server holds (a run described otherwise, a lease no longer held)
* 413 ``BodyTooLarge``      a wire body above ``--max-body-bytes``, a JSON body above 1 MiB (also Sanic's own 413)
* 422 ``InvalidRequest``    well-formed body with wrong keys, dtypes, shapes or values
  (``InvalidTensors`` for tensor bodies)
* 500                       a bug or a failed forward: logged with its traceback under a
  request id; the answer carries only that id (body and ``X-Request-Id``), never the
  exception's text, which can name paths, devices or data
* 503 ``Unavailable``       not ready, draining or over capacity (with ``Retry-After``)
"""

from __future__ import annotations

import logging
import uuid

from sanic import Request, Sanic
from sanic.exceptions import SanicException
from sanic.response import HTTPResponse, json

from eagle3_client.protocol import ERROR_ID_HEADER

__all__ = [
    "ApplianceError",
    "BodyTooLarge",
    "Conflict",
    "InvalidRequest",
    "InvalidTensors",
    "MalformedBody",
    "NotConfigured",
    "NotFound",
    "Unauthorized",
    "Unavailable",
    "install_error_handler",
    "internal_error_response",
]

logger = logging.getLogger(__name__)


class ApplianceError(SanicException):
    """Base class: ``status_code`` and ``quiet`` are class attributes, the message is the detail."""

    status_code = 500
    quiet = True


class MalformedBody(ApplianceError):
    status_code = 400


class Unauthorized(ApplianceError):
    status_code = 401


class NotFound(ApplianceError):
    status_code = 404


class NotConfigured(ApplianceError):
    status_code = 409


class Conflict(ApplianceError):
    status_code = 409


class BodyTooLarge(ApplianceError):
    status_code = 413


class InvalidRequest(ApplianceError):
    status_code = 422


class InvalidTensors(InvalidRequest):
    """A wire body whose keys, dtypes, shapes or values are wrong."""


class Unavailable(ApplianceError):
    status_code = 503


def error_response(exc: SanicException) -> HTTPResponse:
    """``{"error": message, "type": name, "status": code}`` with the exception's status (a deliberate refusal)."""
    status = int(exc.status_code)
    message = str(exc) or exc.message or type(exc).__name__
    headers = dict(getattr(exc, "headers", None) or {})
    return json({"error": message, "type": type(exc).__name__, "status": status}, status=status, headers=headers)


def internal_error_response(request_id: str) -> HTTPResponse:
    """A 500 that names only the request id its failure was logged under."""
    message = f"internal server error (request id {request_id}); the server's log has the details"
    body = {"error": message, "type": "InternalError", "status": 500, "request_id": request_id}
    return json(body, status=500, headers={ERROR_ID_HEADER: request_id})


def install_error_handler(app: Sanic) -> None:
    """Route every exception, Sanic's own (404, 405, 413, ...) included, to JSON."""

    @app.exception(Exception)
    async def _handle(request: Request, exc: Exception) -> HTTPResponse:
        # 5xx are bugs or failed forwards, except our own deliberate refusals (503 busy/draining).
        if not isinstance(exc, SanicException) or (int(exc.status_code) >= 500 and not isinstance(exc, Unavailable)):
            request_id = uuid.uuid4().hex
            logger.error("%s %s failed (request id %s)", request.method, request.path, request_id, exc_info=exc)
            return internal_error_response(request_id)
        return error_response(exc)
