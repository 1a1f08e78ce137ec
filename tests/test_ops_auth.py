"""Bearer-token auth on a real server: every endpoint but the health probes refuses a missing or
wrong token, the probes (and so the container's and Slurm's readiness checks) need none, and
our client (token argument or environment) works bit-exactly."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import requests
import torch

from eagle3_appliance.core.inputs import GenerateInputs, VocabMapping
from eagle3_appliance.model.loading import load_target
from eagle3_appliance.model.supervision import in_process, supervision_equal
from eagle3_appliance.settings import Settings
from eagle3_client import RemoteEagle3TargetModel, TargetHTTPError, protocol, wire
from eagle3_client.synthetic import random_batch, vocab_mapping
from tests.ops_support import REPO, server

TOKEN = "s3cret-token-for-tests"

# Every endpoint that needs the token, with a request that is valid apart from auth.
PROTECTED = [
    ("GET", protocol.EP_METRICS, b""),
    ("GET", protocol.EP_GPUS, b""),
    ("POST", protocol.EP_MODEL_INFO, b""),
    ("POST", protocol.EP_INPUT_EMBEDDINGS, b""),
    ("POST", protocol.EP_SESSION, b"{}"),
    ("POST", protocol.EP_INIT_NCCL, b'{"nccl_port": 1}'),
    ("POST", protocol.EP_HEARTBEAT, b"{}"),
    ("POST", protocol.EP_SET_VOCAB_MAPPING, b"mapping"),
    ("POST", protocol.EP_GENERATE, b"inputs"),
    ("POST", protocol.EP_DISCONNECT, b"{}"),
    ("POST", protocol.EP_LM_HEAD_ROWS, b"rows"),
]
# The probes: open to anyone, token or not (docs/operations.md, "Authentication").
PROBES = {
    protocol.EP_HEALTH: {"status": "ok"},
    protocol.EP_HEALTH_LIVE: {"status": "live"},
    protocol.EP_V2_HEALTH_LIVE: {"status": "live"},
    protocol.EP_HEALTH_READY: {"status": "ready"},
    protocol.EP_V2_HEALTH_READY: {"status": "ready"},
}


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("auth")
    token_file = tmp / "token"
    token_file.write_text(TOKEN + "\n")
    env = {"EAGLE3_AUTH_TOKEN": ""}  # the server reads the file only
    with server(["--auth-token-file", str(token_file)], env, tmp / "server.log") as proc:
        yield proc.url


def _bodies() -> dict[str, bytes]:
    mapping = VocabMapping(*vocab_mapping(1024, 64))
    ids, mask, loss = random_batch(1024, 1, 8, seed=0)
    return {
        protocol.EP_SET_VOCAB_MAPPING: wire.encode(
            {"selected_token_ids": mapping.selected_token_ids, "selected_token_mask": mapping.selected_token_mask}
        ),
        protocol.EP_GENERATE: wire.encode({"input_ids": ids, "attention_mask": mask, "loss_mask": loss}),
        protocol.EP_LM_HEAD_ROWS: wire.encode({"selected_token_ids": mapping.selected_token_ids}),
    }


def _call(url: str, method: str, endpoint: str, body: bytes, auth: str | None) -> httpx.Response:
    headers = {"Content-Type": "application/octet-stream"}
    if auth is not None:
        headers["Authorization"] = auth
    content = _bodies().get(endpoint, body) if method == "POST" else None
    return httpx.request(method, url + protocol.path(endpoint), content=content, headers=headers, trust_env=False)


@pytest.mark.parametrize("auth", [None, "Bearer wrong-token", f"Basic {TOKEN}", "Bearer", f"Bearer {TOKEN}x"])
def test_every_protected_endpoint_refuses_a_missing_or_wrong_token(url: str, auth: str | None) -> None:
    for method, endpoint, body in PROTECTED:
        resp = _call(url, method, endpoint, body, auth)
        assert resp.status_code == 401, (endpoint, resp.status_code, resp.text)
        assert resp.json()["status"] == 401
        assert resp.headers["www-authenticate"].startswith("Bearer")


def test_the_right_token_opens_every_endpoint(url: str) -> None:
    for method, endpoint, body in PROTECTED:
        resp = _call(url, method, endpoint, body, f"Bearer {TOKEN}")
        assert resp.status_code == 200, (endpoint, resp.status_code, resp.text)


@pytest.mark.parametrize("auth", [None, "Bearer wrong-token", f"Bearer {TOKEN}"])
def test_every_probe_answers_without_a_token_and_says_only_its_state(url: str, auth: str | None) -> None:
    for endpoint, body in PROBES.items():
        resp = _call(url, "GET", endpoint, b"", auth)
        assert (resp.status_code, resp.json()) == (200, body), (endpoint, resp.text)


def test_the_container_probe_passes_on_a_server_started_with_a_token_file(url: str) -> None:
    """The image's HEALTHCHECK as Docker runs it, in a container configured with a token file."""
    env = {"PATH": os.environ["PATH"], "EAGLE3_AUTH_TOKEN_FILE": "/run/secrets/eagle3-token"}
    done = subprocess.run(
        [sys.executable, str(REPO / "containers" / "healthcheck.py"), "--url", url],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (done.returncode, done.stdout.strip()) == (0, "ready: /health/ready: 200"), done.stdout + done.stderr


def test_without_nvml_the_server_is_ready_and_says_why_there_are_no_gpus(url: str) -> None:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    report = httpx.get(url + "/gpus", headers=headers, trust_env=False).json()
    assert report["nvml"] is False and report["gpus"] == [] and report["fatal"] == []
    assert report["error"].startswith("NVML unavailable")
    assert httpx.get(url + "/health/ready", trust_env=False).status_code == 200


def test_our_client_sends_the_token_from_its_argument_or_the_environment(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference = load_target(Settings())
    mapping = VocabMapping(*vocab_mapping(reference.logits_size, 128))
    inputs = random_batch(reference.vocab_size, 2, 16, seed=5)
    expected = in_process(reference, GenerateInputs(*inputs), mapping)
    monkeypatch.delenv("EAGLE3_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("EAGLE3_AUTH_TOKEN_FILE", raising=False)
    with RemoteEagle3TargetModel.from_urls([url], token=TOKEN) as remote:
        remote.set_vocab_mapping(mapping.selected_token_ids, mapping.selected_token_mask)
        assert supervision_equal(remote.generate_batch(*inputs), expected)
    monkeypatch.setenv("EAGLE3_AUTH_TOKEN", TOKEN)
    with RemoteEagle3TargetModel.from_urls([url]) as remote:
        assert torch.equal(remote.get_input_embeddings().weight, reference.input_embeddings)
    monkeypatch.setenv("EAGLE3_AUTH_TOKEN", "not-it")
    with RemoteEagle3TargetModel.from_urls([url]) as remote, pytest.raises(TargetHTTPError) as err:
        remote.model_info()
    assert err.value.status == 401 and "invalid bearer token" in str(err.value)


def test_gpus_command_reads_a_server_with_the_token_from_the_environment(url: str) -> None:
    env = {**os.environ, "EAGLE3_AUTH_TOKEN": TOKEN, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-m", "eagle3_appliance", "gpus", "--url", url],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("no GPU readings: NVML unavailable")


def test_token_file_and_token_together_are_refused(tmp_path: Path) -> None:
    (tmp_path / "t").write_text("x")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "eagle3_appliance",
            "serve",
            "--auth-token",
            "a",
            "--auth-token-file",
            str(tmp_path / "t"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "either --auth-token or --auth-token-file" in done.stderr


def test_a_large_unauthenticated_wire_body_gets_a_clean_401(url: str) -> None:
    """Before the token check only 1 MiB of a body may be read, so a 16 MiB body is left unread and
    the connection closed; the client still reads the 401 (with ``requests``, upstream's HTTP library)."""
    for _ in range(3):  # a reset would depend on timing: try it more than once
        resp = requests.post(url + protocol.path(protocol.EP_GENERATE), data=b"\0" * (16 << 20), timeout=60)
        assert (resp.status_code, resp.json()["status"]) == (401, 401)
