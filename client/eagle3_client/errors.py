"""Exceptions raised by the client. Catch at the level you need::

    RemoteTargetError                 anything that went wrong talking to a target server
    ├── TargetUnreachable             connection refused/reset, after all retries
    │   ├── TargetTimeout             no answer within the timeout, after all retries
    │   └── NoServerReady             no server of the fleet was ready within failover_timeout
    ├── TargetHTTPError               the server answered with a non-200 status
    │   └── TargetOverloaded          503 that persisted past every Retry-After
    │       └── TargetTimeLimit       503: the request passed the server's time limit (not a server failure)
    ├── ProtocolViolation             the server's answer does not follow the protocol
    ├── ModelMismatch                 the servers of one client serve different models
    ├── CapabilityUnavailable         the request needs an extension the server did not grant (packing)
    ├── CaptureUnsupported            a server cannot serve the requested capture (DFlash on an upstream server)
    ├── DataPlaneUnavailable          a forced data plane this pair cannot do (eagle3_client.transports.negotiate)
    └── TransferError                 a process-group transfer broke (eagle3_client.transports.transfer; recovered
        ├── TransferTimeout           over the wire by the client, never raised to the trainer)
        └── TransferDesync

Every message names the URL; a ``TargetHTTPError`` carries the server's own error text
(``.status``, ``.server_message``), so a 422 about token ids reads as such in the trainer.
``NoServerReady`` and ``ModelMismatch`` name every server concerned (``.reasons``,
``.fingerprints``).
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = [
    "CapabilityUnavailable",
    "CaptureUnsupported",
    "ModelMismatch",
    "NoServerReady",
    "ProtocolViolation",
    "RemoteTargetError",
    "TargetHTTPError",
    "TargetOverloaded",
    "TargetTimeLimit",
    "TargetTimeout",
    "TargetUnreachable",
]


class RemoteTargetError(RuntimeError):
    """Base class of every client-side error."""


class TargetUnreachable(RemoteTargetError):
    """The server could not be reached (connection errors) even after the retries."""


class TargetTimeout(TargetUnreachable):
    """The server did not answer within the timeout, even after the retries."""


class TargetHTTPError(RemoteTargetError):
    """The server answered with an error status; never retried (it would answer the same)."""

    def __init__(self, url: str, status: int, server_message: str) -> None:
        self.url = url
        self.status = status
        self.server_message = server_message
        super().__init__(f"{url} answered HTTP {status}: {server_message}")


class TargetOverloaded(TargetHTTPError):
    """The server kept answering 503 (busy or draining) past the client's patience."""


class TargetTimeLimit(TargetOverloaded):
    """The request passed the server's own time limit (``--request-timeout``) on every attempt.

    The server is alive and was computing the request: the client sent it again ``max_retries``
    times at once under one request id (each attempt joined the one computation) and neither
    fails the server over nor registers a new session, which would start the forward afresh.
    ``attempts`` says how many were made.
    """

    def __init__(self, url: str, status: int, server_message: str, attempts: int = 1) -> None:
        super().__init__(url, status, server_message)
        self.attempts = attempts
        self.args = (f"{self} (after {attempts} attempt(s) under one request id)",)


class ProtocolViolation(RemoteTargetError):
    """The server's answer is not what the protocol allows (bad body, wrong keys)."""


class NoServerReady(TargetUnreachable):
    """No server could take a request for ``failover_timeout`` seconds; ``reasons`` says why each is out.

    ``reasons`` maps every server's URL to why it is out of the rotation (its last failure
    and the last readiness probe).
    """

    def __init__(self, message: str, reasons: Mapping[str, str]) -> None:
        self.reasons = dict(reasons)
        lines = [f"  {url}: {why}" for url, why in self.reasons.items()] or ["  (the server list is empty)"]
        super().__init__("\n".join([message, *lines]))


class ModelMismatch(RemoteTargetError):
    """The servers of one client serve different models (their fingerprints differ), or a server
    came back (a new session, e.g. after a restart on its address) with another model than the
    one the client pinned at its first connect.

    Training on a mix would give the draft inconsistent supervision without any error, so the
    client refuses the fleet, or that server. ``fingerprints`` maps each server's URL to its fingerprint.
    """

    def __init__(self, message: str, fingerprints: Mapping[str, str]) -> None:
        self.fingerprints = dict(fingerprints)
        super().__init__(message)


class CapabilityUnavailable(RemoteTargetError):
    """The request needs a capability (``protocol.CAPABILITIES``) that this server did not grant.

    Raised before anything is sent: an upstream server (or an older appliance) would compute
    the batch without the extension, e.g. packed rows as single sequences, whose supervision
    crosses document boundaries without any error. ``url`` and ``capability`` say which.
    """

    def __init__(self, url: str, capability: str, reason: str) -> None:
        self.url = url
        self.capability = capability
        super().__init__(f"{url} cannot serve {capability!r} requests: {reason}")


def first_line(exc: object, limit: int | None = None) -> str:
    """The first line of ``exc``'s message (at most ``limit`` characters), for one-line reasons in
    logs and stats; its type's name when the message is empty (``str(exc)`` can be)."""
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return line if limit is None else line[:limit]


class CaptureUnsupported(RemoteTargetError):
    """A server cannot serve the capture this client asks for (eagle3_client.capture).

    An upstream server (no ``/session``) or an appliance that predates the capture would answer
    every ``/generate`` with EAGLE-3 supervision, so the client refuses to use it instead.
    """
