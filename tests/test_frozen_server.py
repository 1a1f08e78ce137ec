"""A server frozen (SIGSTOP) with a request in flight, beside a ready one (issue #33, item 3).

The frozen server accepts connections (the kernel does) but answers nothing, so only a deadline
tells it from a slow one. Its heartbeats fail within one beat; the client then marks it suspect,
abandons the attempt on it and sends the request to the ready server at once, where it is
computed once, instead of waiting the derived ``/generate`` wait (minutes) first.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from eagle3_appliance.core.inputs import GenerateInputs, VocabMapping
from eagle3_appliance.model.loading import load_target
from eagle3_appliance.model.supervision import in_process, supervision_equal
from eagle3_appliance.settings import Settings
from eagle3_client import RemoteEagle3TargetModel
from eagle3_client.synthetic import random_batch, vocab_mapping
from tests.ops_support import FORWARD_DELAY_ENV, make_slow_model, metric, model_env, scrape, server, wait_until
from tests.test_fleet import by_url, start_all

FORWARDS = "eagle3_inference_exec_count_total"
VOCAB, DRAFT = 1024, 200
# Every forward of a batch sleeps this long on both servers, so the victim surely holds the request.
DELAY_S = "3.0"
# A beat every 2 s, each given 2 s: a frozen server misses its first beat within about 4 s.
OPTIONS = {"lease_seconds": 6.0, "max_in_flight_per_server": 1, "probe_interval": 0.5, "probe_max_interval": 2.0}


@pytest.mark.serial
@pytest.mark.parametrize("data_plane", ["wire", "gloo"])
def test_a_frozen_server_s_request_moves_to_the_ready_one_within_seconds_and_is_computed_once(
    tmp_path: Path, data_plane: str
) -> None:
    folder = make_slow_model(tmp_path / "model", 30.0)  # the same weights on both servers
    args = ["--model", str(folder), "--trust-remote-code"]
    env = {**model_env(), FORWARD_DELAY_ENV: DELAY_S}
    procs = start_all([server(args, env, tmp_path / f"s{i}.log") for i in range(2)])
    mapping = VocabMapping(*vocab_mapping(VOCAB, DRAFT, seed=3))
    inputs = random_batch(VOCAB, 2, 12, seed=9)
    frozen = None
    remote = RemoteEagle3TargetModel.from_urls([p.url for p in procs], data_plane=data_plane, **OPTIONS)
    try:
        remote.set_vocab_mapping(mapping.selected_token_ids, mapping.selected_token_mask)
        assert remote.options.generate_timeout is None  # the derived wait: minutes
        # One batch each (one in flight per server), so that both data planes are up: the freeze
        # then hits a request waiting for its answer, not a group being joined.
        warm = [remote.generate_batch_async(*random_batch(VOCAB, 2, 8, seed=s)) for s in (1, 2)]
        [h.result(timeout=60) for h in warm]
        assert all(e["served"] == 1 and e["tier"] == data_plane for e in remote.transport_stats())
        before = {p.url: metric(scrape(p.url), FORWARDS) for p in procs}
        handle = remote.generate_batch_async(*inputs)
        busy = wait_until(
            lambda: [p for p in procs if by_url(remote)[p.url]["in_flight"]], timeout=30, what="a request"
        )
        frozen, ready = busy[0], next(p for p in procs if p is not busy[0])
        # In flight there (its forward sleeps 3 s): freeze it mid-request, and keep it frozen.
        assert frozen.proc is not None
        frozen.proc.send_signal(signal.SIGSTOP)
        got = handle.result(timeout=60)  # not minutes: the derived wait is 630 s per attempt
        stats = by_url(remote)
        ready_forwards = metric(scrape(ready.url), FORWARDS) - before[ready.url]
        assert stats[frozen.url]["state"] == "out" and "heartbeat" in stats[frozen.url]["reason"], stats
        assert stats[ready.url]["served"] == 2 and stats[ready.url]["tier"] == data_plane
    finally:
        if frozen is not None and frozen.proc is not None:
            frozen.proc.send_signal(signal.SIGCONT)  # before closing: close() waits for requests in flight
        remote.close()
        for p in procs:
            p.stop()
    assert ready_forwards == 1  # computed once on the ready server
    reference = load_target(Settings(model=str(folder), trust_remote_code=True))
    assert supervision_equal(got, in_process(reference, GenerateInputs(*inputs), mapping))
