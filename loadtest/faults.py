"""Fault mix: well-behaved trainer ranks share the server with clients that misbehave.

Run it (``-u`` a multiple of 8 keeps the 4:1:1:1:1 mix exact)::

    locust -f loadtest/faults.py --headless -u 16 -r 16 -t 2m --host http://server:8001 \
        --csv out/faults --max-p95-ms 2000 --max-error-rate 0

The misbehaving users send malformed bodies (expect 400) and out-of-range token ids
(expect 422), hang up halfway through a request or before its answer, and read a large
answer slowly and give up. Each fault is a success when the server reacts as it should;
the run fails if any fault gets the wrong reaction or if the ranks' ``/generate`` breaks
``--max-error-rate``/``--max-p95-ms``.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

from locust import tag, task
from locust.exception import CatchResponseError

from eagle3_client import protocol, wire
from eagle3_loadtest._batches import make_batch
from eagle3_loadtest._rank import TrainingRank
from eagle3_loadtest._rawhttp import address_of, request_bytes, send_and_hang_up, slow_read

FAULT = "FAULT"  # request type of the raw-socket rows
GENERATE_PATH = protocol.path(protocol.EP_GENERATE)


class FaultMixRank(TrainingRank):
    """A well-behaved rank; its /generate row is what the limits apply to."""

    scenario = "faults"
    weight = 4

    @tag("faults")
    @task
    def generate(self) -> None:
        self.generate_once()


class _Misbehaving(TrainingRank):
    """Registers like a rank (so that its requests reach the model), then misbehaves."""

    abstract = True
    scenario = "faults"
    weight = 1
    interval_s = 0.5  # between two faults: a fault mix, not a flood

    def wait_time(self) -> float:
        return self.interval_s

    def expect(self, resp: Any, status: int) -> None:
        """Success exactly when the server answered ``status``."""
        if resp.status_code == status:
            resp.success()
        else:
            resp.failure(f"expected HTTP {status}, got {resp.status_code}: {(resp.text or '')[:200]}")

    def record(self, name: str, started: float, length: int, error: Exception | None) -> None:
        self.environment.events.request.fire(
            request_type=FAULT,
            name=name,
            response_time=(time.perf_counter() - started) * 1000,
            response_length=length,
            exception=error,
            context={},
        )


class MalformedBody(_Misbehaving):
    """Garbage, a truncated blob or an empty body: the server must answer 400."""

    @tag("faults")
    @task
    def malformed_body(self) -> None:
        if not self.ensure_registered():
            return
        assert self.spec is not None
        valid = wire.encode(make_batch(self.spec, self.rng))
        body = self.rng.choice((b"JUNK" + self.rng.randbytes(60), valid[: len(valid) // 2], b""))
        with self.client.post(
            GENERATE_PATH, data=body, headers=self.wire_headers, name="fault: malformed body", catch_response=True
        ) as resp:
            self.expect(resp, 400)


class OutOfRangeTokens(_Misbehaving):
    """A well-formed batch with one token id outside ``[0, vocab)``: the server must answer 422."""

    @tag("faults")
    @task
    def out_of_range_tokens(self) -> None:
        if not self.ensure_registered():
            return
        assert self.spec is not None
        batch = make_batch(self.spec, self.rng)
        batch["input_ids"][0, 0] = self.rng.choice((self.vocab_size, self.vocab_size + 12345, -1))
        with self.client.post(
            GENERATE_PATH,
            data=wire.encode(batch),
            headers=self.wire_headers,
            name="fault: out-of-range token ids",
            catch_response=True,
        ) as resp:
            self.expect(resp, 422)


class AbruptDisconnect(_Misbehaving):
    """Hang up halfway through sending a request, or right after sending it (a killed trainer)."""

    hang_ups = 0

    @tag("faults")
    @task
    def hang_up(self) -> None:
        if not self.ensure_registered():
            return
        assert self.spec is not None
        address = address_of(self.host or "")
        head, body = request_bytes(
            "POST", GENERATE_PATH, address, wire.encode(make_batch(self.spec, self.rng)), self.wire_headers
        )
        self.hang_ups += 1
        midway = self.hang_ups % 2 == 1  # alternate, so that both kinds happen from the second call on
        name = "fault: hang up mid-request" if midway else "fault: hang up before the answer"
        started, error, sent = time.perf_counter(), None, 0
        try:
            sent = send_and_hang_up(address, head + body[: len(body) // 2] if midway else head + body, 10.0)
        except OSError as exc:
            error = exc
        self.record(name, started, sent, error)


class SlowReader(_Misbehaving):
    """Ask for a large answer, then read it at ``--slow-read-rate`` for at most ``--slow-read-max-time``.

    Waiting for the answer to start (the forward may queue behind others) is bounded by
    ``--request-timeout`` like any request; only the reading is slow.
    """

    @tag("faults")
    @task
    def read_slowly(self) -> None:
        if not self.ensure_registered():
            return
        assert self.spec is not None
        settings = self.settings
        spec = replace(self.spec, batch_size=settings.slow_read_batch, padding="max")
        address = address_of(self.host or "")
        head, body = request_bytes(
            "POST", GENERATE_PATH, address, wire.encode(make_batch(spec, self.rng)), self.wire_headers
        )
        started, error, length = time.perf_counter(), None, 0
        try:
            result = slow_read(
                address, head, body, settings.slow_read_rate, settings.slow_read_max_time, settings.request_timeout
            )
            length = result.body_read
            if result.status != 200:
                error = CatchResponseError(f"expected HTTP 200 before hanging up, got {result.status}")
        except OSError as exc:
            error = exc
        self.record("fault: slow reader", started, length, error)
