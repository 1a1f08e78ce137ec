"""Series a dashboard and alerts rely on exist from the first scrape, before any event happened.

A labelled counter that is first exported at 1 makes ``rate()`` and ``increase()`` miss that first
event, and an alert on "refusals per second" stays silent for the first refusal of a run; the
known label values therefore start at 0. The limits a saturation alert divides by are exported too.
"""

from __future__ import annotations

from eagle3_appliance.launch import ServerProcess
from tests.ops_support import scrape


def test_known_label_values_start_at_zero(server: ServerProcess) -> None:
    samples = scrape(server.url)
    for name, label, values in [
        ("eagle3_connections_refused_total", "reason", ("connections", "probe_only", "body_budget")),
        ("eagle3_connections_timed_out_total", "phase", ("headers", "body")),
        ("eagle3_generate_abandoned_total", "reason", ("client_gone", "timeout")),
        ("eagle3_session_ends_total", "reason", ("disconnect", "expired", "shutdown")),
    ]:
        for value in values:
            assert (name, frozenset({(label, value)})) in samples, f"{name}{{{label}={value!r}}} missing"


def test_fallbacks_start_at_zero_for_each_group_tier(server: ServerProcess) -> None:
    samples = scrape(server.url)
    for requested in ("nccl", "gloo"):
        key = ("eagle3_dataplane_fallbacks_total", frozenset({("requested", requested)}))
        assert samples.get(key) == 0.0, f"{key} missing"


def test_limits_are_exported_with_their_values(server: ServerProcess) -> None:
    samples = scrape(server.url)
    limits = {dict(labels)["limit"]: value for (name, labels), value in samples.items() if name == "eagle3_limit"}
    # conftest's server: --max-seq-len 512, every other limit at its default.
    assert limits["max_queue"] == 64
    assert limits["max_sessions"] == 1024
    assert limits["max_seq_len"] == 512
    assert limits["max_body_bytes"] == 64 << 20
    assert limits["max_batch_tokens"] > 0
    assert limits["max_connections"] > 0
    assert limits["max_pending_body_bytes"] >= limits["max_body_bytes"]
