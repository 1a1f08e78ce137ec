"""Fault mix: well-behaved trainer ranks share the server with clients that misbehave.

Run it (``-u`` a multiple of 8 keeps the 4:1:1:1:1 mix exact)::

    locust -f loadtest/faults.py --headless -u 16 -r 16 -t 2m --host http://server:8001 \
        --csv out/faults --max-p95-ms 2000 --max-error-rate 0

The misbehaving users send malformed bodies (expect 400) and out-of-range token ids
(expect 422), hang up halfway through a request or before its answer, and read a large
answer slowly and give up. Each fault is a success when the server reacts as it should;
the run fails if any fault gets the wrong reaction or if the ranks' ``/generate`` breaks
``--max-error-rate``/``--max-p95-ms``.

With ``--kill-restart N`` one more user (on top of ``-u``) starts a spare server of the same
model, trains through the real client on the fleet ``[--host, spare]``, and N times kills the
spare with SIGKILL and restarts it on the same port: every batch must still arrive, valid
(failover), and the client must use the spare again after each restart (re-admission)::

    locust -f loadtest/faults.py --headless -u 8 -r 8 -t 1m --host http://127.0.0.1:8001 \
        --kill-restart 2 --spare-server-cmd "{python} -m eagle3_appliance serve --port {port} --model builtin"
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Any

import gevent
from locust import tag, task
from locust.exception import CatchResponseError, StopUser

from eagle3_client import RemoteEagle3TargetModel, protocol, wire
from eagle3_client.protocol import SUPERVISION_KEYS
from eagle3_loadtest._batches import make_batch, make_vocab_mapping
from eagle3_loadtest._fleet import SpareServer
from eagle3_loadtest._rank import TrainingRank
from eagle3_loadtest._rawhttp import address_of, request_bytes, send_and_hang_up, slow_read
from eagle3_loadtest._validate import check_supervision

FAULT = "FAULT"  # request type of the raw-socket rows
FLEET = "FLEET"  # request type of the kill-and-restart rows
GENERATE_PATH = protocol.path(protocol.EP_GENERATE)


def _record(user: Any, kind: str, name: str, started: float, length: int, error: Exception | None) -> None:
    """A row for something that is not a Locust HTTP request (a raw socket, the real client)."""
    user.environment.events.request.fire(
        request_type=kind,
        name=name,
        response_time=(time.perf_counter() - started) * 1000,
        response_length=length,
        exception=error,
        context={},
    )


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
    streams = False  # its faults need a session of its own, whatever --stream-queue says
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
        _record(self, FAULT, name, started, length, error)


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


class ServerKillRestart(TrainingRank):
    """A rank training on the fleet ``[--host, spare]``; ``--kill-restart`` times: kill the spare, restart it.

    Rows: ``fleet: generate`` (every batch through the real client, checked in full),
    ``fault: server killed`` (success when the next batches still arrive: failover) and
    ``fault: server restarted`` (success when the client took the spare back within its
    longest probe interval plus a margin, and sent it a batch).
    """

    scenario = "faults"
    fixed_count = 1  # one, whatever -u is: the 4:1:1:1:1 mix of the others stays as it was
    needs_kill_restart = True
    streams = False  # it trains through the real client on its fleet
    probe_max_interval = 1.0
    readmission_margin_s = 15.0

    def on_start(self) -> None:
        logging.getLogger("httpx").setLevel(logging.WARNING)  # the client's every request would be logged
        self.spare: SpareServer | None = None
        self.remote: RemoteEagle3TargetModel | None = None
        self.kills_left = self.settings.kill_restart
        self.restart_started: float | None = None  # a restart whose outcome is not recorded yet

    def on_stop(self) -> None:
        if self.restart_started is not None:  # the run ended first: that is a failed restart, not a silent one
            error = CatchResponseError("the run ended before the restarted spare was used again (raise -t)")
            self.record("fault: server restarted", self.restart_started, 0, error)
            self.restart_started = None
        try:
            if self.remote is not None:
                self.remote.close()
        finally:
            # Quitting the runner kills this greenlet at its next wait, which may be inside
            # close(): the spare must still be stopped, or it outlives this Locust process.
            if self.spare is not None:
                self.spare.stop()

    def _fleet(self) -> RemoteEagle3TargetModel | None:
        """The spare started and the client built (once); None when the spare could not start (recorded)."""
        if self.remote is not None:
            return self.remote
        if not self.ensure_registered():
            return None
        settings = self.settings
        started = time.perf_counter()
        try:
            self.spare = SpareServer(settings.spare_server_cmd, settings.spare_start_timeout)
            self.spare.start()
        except (OSError, RuntimeError) as exc:
            self.record("fault: spare server start", started, 0, exc)
            self.kills_left = 0
            return None
        self.record("fault: spare server start", started, 0, None)
        remote = RemoteEagle3TargetModel.from_urls(
            [self.host or "", self.spare.url],
            data_plane="wire",
            token=settings.auth_token or None,
            timeout=settings.request_timeout,
            probe_interval=0.2,
            probe_max_interval=self.probe_max_interval,
            failover_timeout=settings.spare_start_timeout,
        )
        mapping = make_vocab_mapping(self.vocab_size, settings.draft_vocab, settings.seed)
        remote.set_vocab_mapping(mapping["selected_token_ids"], mapping["selected_token_mask"])
        self.remote = remote
        return remote

    def record(self, name: str, started: float, length: int, error: Exception | None) -> None:
        _record(self, FLEET, name, started, length, error)

    def generate_through_fleet(self) -> bool:
        """One batch through the client (failover included), checked; recorded as ``fleet: generate``."""
        assert self.remote is not None and self.spec is not None and self.expected is not None
        request = make_batch(self.spec, self.rng)
        started, error, length = time.perf_counter(), None, 0
        try:
            batch = self.remote.generate_batch(*(request[k] for k in protocol.GENERATE_INPUT_KEYS))
            tensors = {key: getattr(batch, key) for key in SUPERVISION_KEYS}
            check_supervision(tensors, request, self.expected)
            length = sum(t.numel() * t.element_size() for t in tensors.values())
        except Exception as exc:  # noqa: BLE001 - every failure is this row's failure
            error = exc
        self.record("fleet: generate", started, length, error)
        return error is None

    def train_for(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.generate_through_fleet()

    def spare_entry(self) -> dict[str, Any]:
        assert self.remote is not None and self.spare is not None
        return next(e for e in self.remote.transport_stats() if e["url"] == self.spare.url)

    @tag("faults")
    @task
    def kill_and_restart(self) -> None:
        remote = self._fleet()
        if remote is None or self.spare is None:
            return
        self.train_for(self.settings.kill_interval)
        if self.kills_left <= 0:
            if self.settings.stop_after_kill_restart and self.environment.runner is not None:
                # From its own greenlet: quitting stops every user, this one included.
                gevent.spawn(self.environment.runner.quit)
                raise StopUser
            return
        self.kills_left -= 1
        started = time.perf_counter()
        self.spare.kill()
        answered = all([self.generate_through_fleet() for _ in range(3)])  # every one must fail over
        self.record("fault: server killed", started, 0, None if answered else CatchResponseError("a batch was lost"))
        self.restart_started = time.perf_counter()
        error: Exception | None = None
        try:
            self.spare.start()
            served = self.spare_entry()["served"]
            deadline = time.monotonic() + self.probe_max_interval + self.readmission_margin_s
            # One snapshot per pass: its state and its count belong together.
            while (entry := self.spare_entry())["state"] != "ready" or entry["served"] == served:
                if time.monotonic() > deadline:
                    raise CatchResponseError(f"the restarted spare was not used again: {entry}")
                self.generate_through_fleet()
        except (OSError, RuntimeError, CatchResponseError) as exc:
            error = exc
            self.kills_left = 0
        self.record("fault: server restarted", self.restart_started, 0, error)
        self.restart_started = None
