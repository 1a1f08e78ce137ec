"""Choosing a tier and reading the options: the rules, without a server."""

from __future__ import annotations

import pytest
import torch

from eagle3_appliance.dataplanes.port_pool import PortPool
from eagle3_appliance.errors import Unavailable
from eagle3_appliance.settings import parse_port_range
from eagle3_client.transports.negotiate import DataPlaneUnavailable, choose_tier, local_tiers
from eagle3_client.transports.transfer import host_store

BOTH = ["nccl", "gloo", "wire"]


def test_auto_takes_the_fastest_tier_both_ends_have() -> None:
    assert choose_tier("auto", BOTH, BOTH, "u") == "nccl"
    # A CPU trainer: gloo moves an answer at about half the wire's rate (docs/data-planes.md), so the wire.
    assert choose_tier("auto", ["gloo", "wire"], BOTH, "u") == "wire"
    assert choose_tier("auto", BOTH, ["gloo", "wire"], "u") == "wire"
    assert choose_tier("auto", BOTH, ["wire"], "u") == "wire"  # an upstream server
    assert choose_tier("wire", BOTH, BOTH, "u") == "wire"
    assert choose_tier("gloo", ["gloo", "wire"], BOTH, "u") == "gloo"  # a forced tier stays forced


def test_a_forced_tier_the_pair_cannot_do_is_a_clear_error() -> None:
    with pytest.raises(DataPlaneUnavailable, match=r"this process can only do \['gloo', 'wire'\]"):
        choose_tier("nccl", ["gloo", "wire"], BOTH, "http://s:1")
    with pytest.raises(DataPlaneUnavailable, match=r"http://s:1 offers only \['wire'\]"):
        choose_tier("gloo", ["gloo", "wire"], ["wire"], "http://s:1")


def test_a_cpu_process_can_do_gloo_and_wire_but_not_nccl() -> None:
    assert local_tiers(torch.device("cpu"), env={}) == ["gloo", "wire"]
    if not torch.cuda.is_available():
        assert local_tiers(torch.device("cuda"), env={}) == ["gloo", "wire"]


def test_port_ranges() -> None:
    assert parse_port_range("") is None and parse_port_range("0") is None
    assert parse_port_range("29600-29699") == (29600, 29699)
    assert parse_port_range(" 29600 ") == (29600, 29600)
    for bad in ("x", "10-5", "0-3", "70000"):
        with pytest.raises(ValueError):
            parse_port_range(bad)


def test_port_pool_skips_busy_ports_and_says_when_the_range_is_full() -> None:
    squatter = host_store("127.0.0.1", 0, 5.0)  # some other process's listener, say
    busy = int(squatter.port)
    pool = PortPool((busy, busy + 1))
    store, port = pool.open_store("127.0.0.1", 5.0)
    assert port == busy + 1  # the held port was skipped
    with pytest.raises(Unavailable, match="in use"):
        pool.open_store("127.0.0.1", 5.0)
    pool.release(port)
    del store
