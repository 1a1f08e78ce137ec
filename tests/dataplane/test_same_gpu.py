"""One GPU for both ends: ``auto`` compares the GPUs' UUIDs and stays off NCCL when they are one.

NVML is the fake ``pynvml`` at the library boundary (tests/fake_nvml); NCCL's availability is
switched on at its one check (``nccl_available``), since a CPU torch has no NCCL. The server
side is a small HTTP stand-in that answers ``/session`` as our appliance would on a GPU.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import ModuleType
from typing import Any

import pytest
import torch

from eagle3_appliance.dataplanes.group_plane import DataPlaneServer
from eagle3_appliance.settings import Settings
from eagle3_client import DataPlaneUnavailable, protocol
from eagle3_client.remote.session import ServerSession
from eagle3_client.transports import negotiate
from eagle3_client.transports.control import ControlPlane
from eagle3_client.transports.gpu_identity import cuda_uuid
from eagle3_client.transports.negotiate import DataPlaneConfig, choose_tier, shared_gpu
from tests.ops_support import healthy_gpus, install_fake_nvml

BOTH = ["nccl", "gloo", "wire"]
GPU0, GPU1 = healthy_gpus()[0]["uuid"], healthy_gpus()[1]["uuid"]


@pytest.fixture
def nvml(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """A fresh fake ``pynvml`` with two GPUs, installed as ``sys.modules["pynvml"]``."""
    module = install_fake_nvml(monkeypatch, {"gpus": healthy_gpus()})
    if torch.cuda.is_available():  # CUDA would answer first: these tests are about the NVML seam
        pytest.skip("a CUDA machine names its GPUs through CUDA, not the fake NVML")
    return module


# -- the ranking --------------------------------------------------------------------------


def test_auto_takes_the_wire_when_both_ends_share_a_gpu(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="eagle3_client.transports.negotiate"):
        assert choose_tier("auto", BOTH, BOTH, "http://s:1", same_gpu=GPU0) == "wire"
    assert f"http://s:1: data plane wire instead of nccl: this trainer and the server are on the same GPU ({GPU0})" in (
        caplog.text
    )
    assert choose_tier("auto", BOTH, BOTH, "u", same_gpu=None) == "nccl"  # different (or unknown) GPUs: unchanged
    assert choose_tier("gloo", BOTH, BOTH, "u", same_gpu=GPU0) == "gloo"  # a forced tier that works stays forced


def test_a_forced_nccl_on_one_gpu_is_a_clear_error() -> None:
    with pytest.raises(DataPlaneUnavailable, match=r"same GPU \(GPU-1111.*\): NCCL cannot pair two ranks on one"):
        choose_tier("nccl", BOTH, BOTH, "http://s:1", same_gpu=GPU0)


# -- the identities, through the NVML seam ----------------------------------------------------


def test_the_trainer_gpu_is_named_by_uuid_in_cuda_order(nvml: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    assert cuda_uuid(torch.device("cuda", 0)) == GPU0
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,0")  # renumbered: CUDA device 0 is NVML's GPU 1
    assert cuda_uuid(torch.device("cuda", 0)) == GPU1
    assert cuda_uuid(torch.device("cuda", 1)) == GPU0
    assert cuda_uuid(torch.device("cuda", 2)) is None  # not visible
    assert cuda_uuid(torch.device("cpu")) is None
    assert shared_gpu(torch.device("cuda", 0), [GPU1]) == GPU1
    assert shared_gpu(torch.device("cuda", 0), [GPU0]) is None  # same index, another GPU
    assert shared_gpu(torch.device("cuda", 0), [GPU1.removeprefix("GPU-").upper()]) == GPU1  # CUDA's spelling


def test_without_nvml_the_gpu_is_unknown(nvml: ModuleType) -> None:
    nvml.configure({"init_error": 12, "gpus": []})
    assert cuda_uuid(torch.device("cuda", 0)) is None
    assert shared_gpu(torch.device("cuda", 0), [GPU0]) is None  # unknown: the ranking as before


def test_the_server_names_the_gpu_of_its_nccl_end(nvml: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert DataPlaneServer.create(Settings(), torch.device("cuda", 0)).gpu_uuids == (GPU1,)
    assert DataPlaneServer.create(Settings(), torch.device("cpu")).gpu_uuids == ()


def test_the_session_reply_carries_the_gpus_only_when_known() -> None:
    reply = protocol.SessionReply("s", gpu_uuids=(GPU0,))
    assert reply.to_json()[protocol.GPU_UUIDS_KEY] == [GPU0]
    assert protocol.SessionReply.from_json(reply.to_json()).gpu_uuids == (GPU0,)
    assert protocol.GPU_UUIDS_KEY not in protocol.SessionReply("s").to_json()  # as an older server's reply
    assert protocol.SessionReply.from_json({"session_id": "s"}).gpu_uuids == ()


# -- the session, against a stand-in of our server on a GPU ----------------------------------


@pytest.fixture
def gpu_server() -> Iterator[tuple[str, dict[str, Any]]]:
    """A stand-in answering ``/session`` (with the reply the test sets) and ``/disconnect``; it counts calls."""
    state: dict[str, Any] = {"reply": {}, "calls": []}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            return

        def do_POST(self) -> None:  # noqa: N802 - http.server API
            endpoint = self.path.lstrip("/")
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            state["calls"].append(endpoint)
            body = state["reply"] if endpoint == protocol.EP_SESSION else {"status": "ok"}
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)


def _session(url: str, preference: str) -> ServerSession:
    control = ControlPlane(url, timeout=10.0, max_retries=0)
    return ServerSession(control, "t", config=DataPlaneConfig(preference=preference), device=torch.device("cuda", 0))


def _reply(gpus: list[str] | None) -> dict[str, Any]:
    body: dict[str, Any] = {"session_id": "s1", "data_planes": BOTH, "lease_seconds": 0}
    if gpus is not None:
        body[protocol.GPU_UUIDS_KEY] = gpus
    return body


@pytest.fixture
def nccl_here(nvml: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(negotiate, "nccl_available", lambda: True)  # a CPU torch has none


def test_a_trainer_on_the_servers_gpu_negotiates_the_wire(
    nccl_here: None, gpu_server: tuple[str, dict[str, Any]], caplog: pytest.LogCaptureFixture
) -> None:
    url, state = gpu_server
    state["reply"] = _reply([GPU0])
    session = _session(url, "auto")
    with caplog.at_level(logging.INFO, logger="eagle3_client.transports.negotiate"):
        session.join(rejoin=False)
    try:
        stats = session.transport_stats()
        assert (stats["tier"], stats["negotiated"]) == ("wire", "wire")
        assert stats["tier_reason"] == (
            f"this trainer and the server are on the same GPU ({GPU0}): NCCL cannot pair two ranks on one device"
        )
        assert "data plane wire instead of nccl" in caplog.text
    finally:
        session.leave()


def test_a_forced_nccl_on_the_servers_gpu_fails_at_connect_and_leaves_nothing(
    nccl_here: None, gpu_server: tuple[str, dict[str, Any]]
) -> None:
    url, state = gpu_server
    state["reply"] = _reply([GPU0])
    with pytest.raises(DataPlaneUnavailable, match="same GPU"):
        _session(url, "nccl").join(rejoin=False)
    assert state["calls"] == [protocol.EP_SESSION, protocol.EP_DISCONNECT]


@pytest.mark.parametrize("gpus", [[GPU1], None], ids=["another-gpu", "server-names-none"])
def test_otherwise_the_ranking_is_unchanged(
    nccl_here: None, gpu_server: tuple[str, dict[str, Any]], gpus: list[str] | None
) -> None:
    url, state = gpu_server
    state["reply"] = _reply(gpus)
    session = _session(url, "auto")
    session.join(rejoin=False)
    try:
        stats = session.transport_stats()
        assert (stats["negotiated"], stats["tier_reason"]) == ("nccl", None)  # the group joins at the first call
    finally:
        session.leave()
