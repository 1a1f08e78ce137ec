"""Answers kept for ``/data_plane/resend`` stay within ``--resend-budget-mb``, and a client whose
kept answer was dropped gets a clear 409 and recovers by asking again (bit-exact)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from eagle3_appliance.core.inputs import VocabMapping
from eagle3_appliance.launch import ServerProcess
from eagle3_appliance.model.target import Target
from eagle3_client import protocol, wire
from eagle3_client.transports.group_plane import GroupDataPlane
from tests.ops_support import metric, scrape

from .helpers import assert_bit_exact, connect, expected, health, inputs, session_id, status

BUDGET_MB = 1


@pytest.fixture(scope="module")
def budget_server(dp_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    args = ["--cache-dir", str(dp_cache), "--resend-budget-mb", str(BUDGET_MB), "--data-plane-timeout", "30"]
    with ServerProcess(args, log_path=tmp_path_factory.mktemp("budget") / "server.log") as proc:
        yield proc


def _nbytes(answer: dict) -> int:
    return sum(t.numel() * t.element_size() for t in answer.values())


def test_the_oldest_kept_answer_is_dropped_and_its_client_recovers_by_asking_again(
    budget_server: ServerProcess, reference: Target, mapping: VocabMapping
) -> None:
    url = budget_server.url
    mine, theirs = inputs(reference, 2, 80, seed=1600), inputs(reference, 2, 80, seed=1601)
    want_mine, want_theirs = expected(reference, mapping, mine), expected(reference, mapping, theirs)
    # One answer fits the budget, two do not.
    assert (BUDGET_MB << 20) / 2 < _nbytes(want_mine) <= BUDGET_MB << 20
    with (
        connect(url, mapping, data_plane="gloo", data_plane_backoff=0) as a,
        connect(url, mapping, data_plane="gloo", data_plane_backoff=0) as b,
    ):
        warm = inputs(reference, 1, 4, seed=1602)
        a.generate_batch(*warm)  # brings a's group up
        plane = a._servers[0].data_plane
        assert isinstance(plane, GroupDataPlane) and plane.tier == "gloo"
        payload = wire.encode(dict(zip(protocol.GENERATE_INPUT_KEYS, mine, strict=True)))
        seq, kind, answer = plane.request_transfer(payload)  # kept for resend, its send on the way
        assert kind == "gloo"
        assert status(url, session_id(a))["resend"]["held"] >= 1
        # b's answer is newer: keeping it drops a's to stay within the budget.
        assert_bit_exact(b.generate_batch(*theirs), want_theirs)
        kept = status(url)["resend"]
        assert kept["held_bytes"] <= kept["budget_bytes"] == BUDGET_MB << 20, kept
        assert kept["dropped"] >= 1, kept
        # a's transfer now breaks (a receive deadline no transfer can meet): the resend finds the
        # answer dropped, answers 409, and a asks again over the wire.
        plane.config = dataclasses.replace(plane.config, timeout=1e-9)
        got = plane.receive(seq, kind, answer, payload)
        for key, value in want_mine.items():
            assert got[key].dtype == value.dtype and torch.equal(got[key], value), key
        stats = a.transport_stats()[0]
        assert stats["fallbacks"] == 1 and stats["bytes"]["wire"] >= _nbytes(want_mine), stats
    samples = scrape(url)
    assert metric(samples, "eagle3_request_failure_total", endpoint="data_plane/resend", status="409") == 1
    assert metric(samples, "eagle3_request_failure_total", endpoint="generate", status="500") == 0
    after = status(url)["resend"]
    assert after["held"] == 0 and after["held_bytes"] == 0, after  # sessions gone, memory given back
    assert health(url) == 200


def test_an_answer_larger_than_the_whole_budget_is_not_kept_and_still_arrives(
    budget_server: ServerProcess, reference: Target, mapping: VocabMapping
) -> None:
    big = inputs(reference, 2, 160, seed=1700)
    want = expected(reference, mapping, big)
    assert _nbytes(want) > BUDGET_MB << 20
    with connect(budget_server.url, mapping, data_plane="gloo") as remote:
        assert_bit_exact(remote.generate_batch(*big), want)
        stats = remote.transport_stats()[0]
        assert (stats["tier"], stats["fallbacks"], stats["bytes"]["wire"]) == ("gloo", 0, 0)
        assert status(budget_server.url, session_id(remote))["resend"]["held_bytes"] <= BUDGET_MB << 20
