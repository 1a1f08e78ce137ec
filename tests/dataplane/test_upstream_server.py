"""Our client against an unmodified upstream server: plain wire, no rendezvous ever attempted."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from eagle3_appliance.core.inputs import VocabMapping
from eagle3_appliance.launch import free_port
from eagle3_appliance.model.target import Target
from eagle3_client import CaptureUnsupported, DataPlaneUnavailable, RemoteDFlashTargetModel, RemoteEagle3TargetModel

from .helpers import assert_bit_exact, connect, expected, inputs, wait_for

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def upstream(dp_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    port = free_port()
    paths = tmp_path_factory.mktemp("upstream") / "paths.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    script = Path(__file__).with_name("upstream_server.py")
    proc = subprocess.Popen([sys.executable, str(script), str(port), str(dp_cache), str(paths)], env=env)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(url + "/health", timeout=1, trust_env=False).status_code == 200
        except httpx.TransportError:
            assert proc.poll() is None, "the upstream stand-in exited"
            return False

    try:
        wait_for(up, "the upstream stand-in", limit=120)
        yield url, paths
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_auto_uses_the_wire_and_never_asks_for_a_rendezvous(
    upstream: tuple[str, Path], reference: Target, mapping: VocabMapping
) -> None:
    url, paths = upstream
    with connect(url, mapping) as remote:  # data_plane="auto"
        for seed in range(3):
            batch_inputs = inputs(reference, 2, 24, seed=600 + seed)
            assert_bit_exact(remote.generate_batch(*batch_inputs), expected(reference, mapping, batch_inputs))
        stats = remote.transport_stats()[0]
        assert (stats["upstream"], stats["tier"], stats["negotiated"], stats["fallbacks"]) == (True, "wire", "wire", 0)
    requested = paths.read_text().splitlines()
    assert "POST /session nccl=None" in requested  # asked once, got 404: an upstream server
    assert not [line for line in requested if "init_nccl" in line or "data_plane" in line], requested
    assert [line for line in requested if line.startswith("POST /generate")] == ["POST /generate nccl=None"] * 3


def test_forcing_a_group_tier_against_an_upstream_server_is_a_clear_error(upstream: tuple[str, Path]) -> None:
    remote = RemoteEagle3TargetModel.from_urls([upstream[0]], data_plane="gloo")
    with pytest.raises(DataPlaneUnavailable, match=r"offers only \['wire'\]"):
        remote.model_info()
    remote.close()


def test_a_dflash_client_refuses_an_upstream_server_by_name_and_never_generates(upstream: tuple[str, Path]) -> None:
    url, paths = upstream
    earlier = len(paths.read_text().splitlines())
    remote = RemoteDFlashTargetModel.from_urls([url], target_layer_ids=[1, 3, 5])
    with pytest.raises(CaptureUnsupported, match=f"{url} is an upstream EAGLE-3 server"):
        remote.generate_batch(*inputs_for_dflash())
    remote.close()
    requested = paths.read_text().splitlines()[earlier:]
    assert "POST /session nccl=None" in requested
    assert not [line for line in requested if "/generate" in line or "lm_head" in line], requested


def inputs_for_dflash() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ids = torch.arange(16).reshape(2, 8)
    return ids, torch.ones_like(ids), torch.ones_like(ids)
