"""``TrainingRank``: a Locust user that behaves like one trainer rank of an EAGLE-3 run.

It registers the way our client does (``/model_info``, then ``POST /session`` when the
server offers sessions, then ``/set_vocab_mapping``), then sends one ``/generate`` at a
time in the real wire format and checks every answer; a wrong answer is reported as a
failed request with the reason. Registration failures are counted on their own rows and
retried after a second, so a server that is still starting does not end the user.
Bodies are built and read with the project's own codec (:mod:`eagle3_client.wire`).

With ``--stream-queue`` the same ranks are stream consumers instead (:mod:`._stream`): after
``/model_info`` each one leases its batches from the run through ``open_stream`` and upstream's
``FeatureDataLoader``, one per task, and its wait for each is its ``STREAM generate`` row.
"""

from __future__ import annotations

import itertools
import logging
import os
import random
import time
from collections.abc import Iterator
from typing import Any, NoReturn

import gevent
import torch
from locust import FastHttpUser
from locust.env import Environment
from locust.exception import StopUser

from eagle3_client import protocol, wire
from eagle3_client.protocol import SUPERVISION_KEYS, SessionOffer, SessionReply

# Importing these registers the options and the listeners every scenario relies on.
from eagle3_loadtest import _metrics, _report, _scenario, _stream  # noqa: F401
from eagle3_loadtest._batches import BatchSpec, make_batch, make_vocab_mapping
from eagle3_loadtest._metrics import COUNTERS, GENERATE, STREAM
from eagle3_loadtest._options import RunSettings
from eagle3_loadtest._validate import (
    DEFAULT_ENCODING,
    Expected,
    SupervisionError,
    check_streamed,
    check_supervision,
    payload_bytes,
)

__all__ = ["GENERATE", "RegistrationFailed", "TrainingRank"]

logger = logging.getLogger(__name__)

# Decoding and checking run in the load generator's one gevent thread; extra torch threads
# would only compete with the server when both run on one machine.
torch.set_num_threads(1)

_USER_IDS = itertools.count()
_RETRY_REGISTRATION_S = 1.0


class RegistrationFailed(RuntimeError):
    """A registration request failed; it is already counted as a failure on its row."""


class TrainingRank(FastHttpUser):
    """Abstract: a concrete scenario subclasses it, sets ``scenario`` and adds a tagged task."""

    abstract = True
    scenario = ""  # the scenario a concrete class belongs to (also its task tag)
    streams = True  # with --stream-queue, a stream consumer (the faults' misbehaving users say False)
    # Timeouts come from --request-timeout; FastHttpUser's own retries stay off (max_retries = 0)
    # because upstream's client does not retry HTTP errors and a retry would hide them.

    def __init__(self, environment: Environment) -> None:
        assert environment.parsed_options is not None  # users start after the command line is parsed
        self.settings = RunSettings.from_options(environment.parsed_options)
        self.network_timeout = self.connection_timeout = self.settings.request_timeout
        super().__init__(environment)
        # Reproducible batches: the same seed, worker and spawn order give the same requests.
        worker = getattr(environment.runner, "worker_index", 0)
        self.rng = random.Random(f"{self.settings.seed}:{worker}:{next(_USER_IDS)}")
        self.headers: dict[str, str] = {}
        if self.settings.auth_token:
            self.headers[protocol.AUTH_HEADER] = f"Bearer {self.settings.auth_token}"
        self.session_id: str | None = None
        self.vocab_size = 0
        self.expected: Expected | None = None
        self.spec: BatchSpec | None = None
        self.stream: tuple[Any, Any, Iterator[Any]] | None = None  # (queue, store, loader) of a stream rank
        self.is_stream = bool(self.settings.stream_queue) and self.streams

    def wait_time(self) -> float:
        return self.settings.think_time

    # -- registration ------------------------------------------------------------------

    def ensure_registered(self) -> bool:
        """Register once; on failure wait a second and report False (the task returns)."""
        if self.expected is not None:
            return True
        try:
            self._register()
        except RegistrationFailed:
            gevent.sleep(_RETRY_REGISTRATION_S)
            return False
        return True

    def _register(self) -> None:
        settings = self.settings
        with self.client.post(
            protocol.path(protocol.EP_MODEL_INFO), headers=self.headers, name="model_info", catch_response=True
        ) as resp:
            info = _json_or_fail(resp)
            try:
                hidden_size, vocab_size = int(info["hidden_size"]), int(info["vocab_size"])
            except (KeyError, TypeError, ValueError):
                resp.failure(f"model_info lacks hidden_size/vocab_size: {info}")
                raise RegistrationFailed from None
            if not 1 <= settings.draft_vocab <= vocab_size:
                resp.failure(f"--draft-vocab {settings.draft_vocab} does not fit this model's vocab of {vocab_size}")
                raise StopUser

        if not self.is_stream:  # a stream rank talks to the appliances through open_stream only
            self._open_session()
        if settings.capture.is_eagle3 and not self.is_stream:  # a DFlash capture needs no draft vocabulary
            mapping = wire.encode(make_vocab_mapping(vocab_size, settings.draft_vocab, settings.seed))
            with self.client.post(
                protocol.path(protocol.EP_SET_VOCAB_MAPPING),
                data=mapping,  # type: ignore[arg-type]  # locust's hint says str|dict; geventhttpclient sends bytes
                headers=self.wire_headers,
                name="set_vocab_mapping",
                catch_response=True,
            ) as resp:
                _json_or_fail(resp)
        self.vocab_size = vocab_size
        self.spec = BatchSpec(
            batch_size=settings.batch_size,
            lengths=settings.lengths,
            vocab_size=vocab_size,
            padding=settings.padding,
            prompt_fraction=settings.prompt_fraction,
            packed_sequence_size=settings.packed_sequence_size,
        )
        self.expected = Expected(
            hidden_size=hidden_size,
            draft_vocab=settings.draft_vocab,
            encoding=settings.encoding,
            capture=settings.capture,
            vocab_size=vocab_size,
        )

    def _open_session(self) -> None:
        """``POST /session``; a 404 means an upstream-style server, which is fine for ``probs``.

        Any other encoding must be confirmed in the session reply. When it is not, the user
        stops with the reason logged (and counted as a failure): every later answer would
        be in an encoding this test was not asked to check.
        """
        encoding, capture = self.settings.encoding, self.settings.capture
        packed = self.settings.packed_sequence_size > 0
        capabilities = (protocol.CAPABILITY_PACKING,) if packed else ()
        client = f"locust-{os.getpid()}-{id(self):x}"
        offer = SessionOffer(client=client, encoding=encoding, capture=capture, capabilities=capabilities).to_json()
        with self.client.post(
            protocol.path(protocol.EP_SESSION), json=offer, headers=self.headers, name="session", catch_response=True
        ) as resp:
            if resp.status_code == 404:
                self.session_id = None
                if not capture.is_eagle3:
                    self._refuse(resp, f"--capture {capture.spec} needs a server with sessions; this one answers 404")
                if packed:
                    self._refuse(
                        resp, "--packed-sequence-size needs a server that grants packing; this one answers 404"
                    )
                if encoding == DEFAULT_ENCODING:
                    resp.success()
                    return
                self._refuse(resp, f"--encoding {encoding} needs a server with sessions; this one answers 404")
            if not capture.is_eagle3 and 400 <= resp.status_code < 500:
                self._refuse(resp, f"the server refused --capture {capture.spec}: {(resp.text or '')[:200]}")
            if encoding != DEFAULT_ENCODING and 400 <= resp.status_code < 500:
                self._refuse(resp, f"the server refused a session with --encoding {encoding}: HTTP {resp.status_code}")
            try:
                reply = SessionReply.from_json(_json_or_fail(resp))
            except ValueError as exc:
                resp.failure(f"bad session reply: {exc}")
                raise RegistrationFailed from None
            if reply.capture != capture:
                self._refuse(
                    resp, f"the server does not serve --capture {capture.spec} (it answered {reply.capture.spec})"
                )
            if reply.encoding != encoding:
                self._refuse(resp, f"the server does not offer --encoding {encoding} (it chose {reply.encoding!r})")
            if packed and protocol.CAPABILITY_PACKING not in reply.capabilities:
                self._refuse(resp, "the server does not grant packing (--packed-sequence-size)")
            self.session_id = reply.session_id
        self.headers[protocol.SESSION_HEADER] = self.session_id

    @staticmethod
    def _refuse(resp: Any, reason: str) -> NoReturn:
        resp.failure(reason)
        logger.error("%s; this user stops", reason)
        raise StopUser

    @property
    def wire_headers(self) -> dict[str, str]:
        return {**self.headers, "Content-Type": protocol.OCTET_STREAM}

    def on_stop(self) -> None:
        if self.stream is not None:  # read-ahead leases go back to the run at once
            queue, store, _ = self.stream
            self.stream = None
            queue.close()
            store.close()
        # Only a session is ended: /disconnect without one would stop an upstream server.
        if self.session_id is not None:
            self.client.post(protocol.path(protocol.EP_DISCONNECT), json={}, headers=self.headers, name="disconnect")
            self.session_id = None

    # -- the training step -------------------------------------------------------------

    def generate_once(self) -> None:
        """One ``/generate`` of a fresh batch, checked in full (a stream rank: its next batch of the run)."""
        if not self.ensure_registered():
            return
        if self.is_stream:
            self.stream_once()
            return
        assert self.spec is not None and self.expected is not None
        request = make_batch(self.spec, self.rng)
        with self.client.post(
            protocol.path(protocol.EP_GENERATE),
            data=wire.encode(request),  # type: ignore[arg-type]  # as above: bytes are sent as is
            headers=self.wire_headers,
            name=GENERATE,
            catch_response=True,
        ) as resp:
            if resp.status_code == 0:
                return  # a connection error, already recorded as this request's failure
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {(resp.text or '')[:200]}")
                if resp.status_code == 410:  # the server forgot our session: register again
                    self.expected = None
                return
            problem = self._check(resp.content or b"", resp.headers, request)
            if problem:
                COUNTERS.invalid += 1
                resp.failure(f"invalid supervision: {problem}")

    def stream_once(self) -> None:
        """The loader's next batch of the run (acking the previous one), checked; its wait is the row's time."""
        settings = self.settings
        started = time.perf_counter()
        error: Exception | None = None
        length = 0
        try:
            if self.stream is None:
                from nemo_automodel.components.speculative.streaming import FeatureDataLoader

                from eagle3_client.streaming.open import open_stream

                options: dict[str, Any] = {"timeout": settings.request_timeout, "data_plane": "wire"}
                if settings.auth_token:
                    options["auth_token"] = settings.auth_token
                queue, store = open_stream(
                    settings.stream_queue,
                    run_id=settings.stream_run_id,
                    consumer=f"locust-{os.getpid()}-{id(self):x}",
                    wait_for_run=settings.request_timeout,
                    read_ahead=settings.stream_read_ahead,
                    **options,
                )
                self.stream = (queue, store, iter(FeatureDataLoader(queue, store)))
            batch = next(self.stream[2])
        except StopIteration:
            logger.info("run %s is closed (every sample acked): this rank stops", settings.stream_run_id)
            raise StopUser from None
        except Exception as exc:  # noqa: BLE001 - every failure is this row's failure
            error = exc
        else:
            assert self.expected is not None
            tensors = {key: getattr(batch, key) for key in SUPERVISION_KEYS}
            try:
                check_streamed(tensors, self.expected)
                length = payload_bytes(tensors)
                COUNTERS.record(
                    response_bytes=length,
                    payload_bytes=length,
                    tokens=batch.input_ids.numel(),
                    real_tokens=int(batch.attention_mask.sum()),
                )
            except SupervisionError as exc:
                COUNTERS.invalid += 1
                error = SupervisionError(f"invalid supervision: {exc}")
        self.environment.events.request.fire(
            request_type=STREAM,
            name=GENERATE,
            response_time=(time.perf_counter() - started) * 1000,
            response_length=length,
            exception=error,
            context={},
        )

    def _check(self, body: bytes, headers: Any, request: dict[str, torch.Tensor]) -> str | None:
        assert self.expected is not None
        encoding = headers.get(protocol.ENCODING_HEADER) if headers else None
        if encoding is not None and encoding != self.expected.encoding:
            return f"answer uses encoding {encoding!r}, this user asked for {self.expected.encoding!r}"
        try:
            tensors = wire.decode(body)
            check_supervision(tensors, request, self.expected)
        except (wire.WireFormatError, SupervisionError) as exc:
            return str(exc)
        COUNTERS.record(
            response_bytes=len(body),
            payload_bytes=payload_bytes(tensors),
            tokens=request["input_ids"].numel(),
            real_tokens=int(request["attention_mask"].sum()),
        )
        return None


def _json_or_fail(resp: Any) -> dict[str, Any]:
    """The JSON object of a 200 answer; otherwise mark the request failed and raise."""
    if resp.status_code != 200:
        error = getattr(resp, "error", None)  # set on connection errors (status 0)
        resp.failure(error if isinstance(error, Exception) else f"HTTP {resp.status_code}: {(resp.text or '')[:200]}")
        raise RegistrationFailed
    try:
        body = resp.json()
    except (TypeError, ValueError):
        body = None
    if not isinstance(body, dict):
        resp.failure(f"expected a JSON object, got {(resp.text or '')[:200]!r}")
        raise RegistrationFailed
    return body
