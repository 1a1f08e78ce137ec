"""Client behaviour that needs no model: retries, error mapping, upstream-server detection."""

from __future__ import annotations

import httpx
import orjson
import pytest
import torch

from eagle3_client import (
    ProtocolViolation,
    RemoteEagle3TargetModel,
    TargetHTTPError,
    TargetOverloaded,
    TargetTimeout,
    TargetUnreachable,
    protocol,
    wire,
)
from eagle3_client.transports.control import ControlPlane

SUPERVISION = {
    "aux_hidden_states": torch.randn(1, 3, 12),
    "target_probs": torch.softmax(torch.randn(1, 3, 5), -1),
    "position_mask": torch.tensor([[[True], [False], [False]]]),
    "input_ids": torch.tensor([[7, 9, 0]]),
    "loss_mask": torch.tensor([[1, 1, 0]]),
}


class Recorder:
    """An httpx transport that answers like a scripted server and records what it was sent."""

    def __init__(self, handler) -> None:  # type: ignore[no-untyped-def]
        self.requests: list[httpx.Request] = []
        self._handler = handler

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self._handler(request, len(self.requests))


def make_remote(handler, **kwargs) -> tuple[RemoteEagle3TargetModel, Recorder]:  # type: ignore[no-untyped-def]
    recorder = Recorder(handler)
    remote = RemoteEagle3TargetModel.from_urls(["http://target:8001"], backoff=0.0, **kwargs)
    for server in remote._servers:
        server.control = ControlPlane(
            server.control.url, max_retries=kwargs.get("max_retries", 3), backoff=0.0,
            transport=httpx.MockTransport(recorder),
        )  # fmt: skip
    return remote, recorder


def upstream_server(request: httpx.Request, _n: int) -> httpx.Response:
    """Like upstream's http.server: 404 for paths it does not know, wire blob for /generate."""
    path = request.url.path.lstrip("/")
    if path == protocol.EP_GENERATE:
        return httpx.Response(200, content=wire.encode(SUPERVISION))
    if path in (protocol.EP_SET_VOCAB_MAPPING, protocol.EP_DISCONNECT):
        return httpx.Response(200, json={"status": "ok"})
    return httpx.Response(404, text="<html>Not Found</html>")


def test_against_an_upstream_server_the_client_speaks_plain_protocol() -> None:
    remote, recorder = make_remote(upstream_server)
    remote.set_vocab_mapping(torch.arange(5), torch.ones(9, dtype=torch.bool))
    batch = remote.generate_batch(torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 3), torch.ones(1, 3))
    for key, value in SUPERVISION.items():
        assert torch.equal(getattr(batch, key), value)
    remote.close()
    paths = [r.url.path for r in recorder.requests]
    assert paths == ["/session", "/set_vocab_mapping", "/generate", "/disconnect"]
    assert all(protocol.SESSION_HEADER not in r.headers for r in recorder.requests)
    assert recorder.requests[2].headers["content-type"] == protocol.OCTET_STREAM
    assert remote._servers[0].upstream is True


def test_our_server_session_id_is_sent_and_a_lost_session_is_re_registered() -> None:
    sessions = iter(["s1", "s2"])
    live = {"current": ""}

    def server(request: httpx.Request, _n: int) -> httpx.Response:
        path = request.url.path.lstrip("/")
        if path == protocol.EP_SESSION:
            live["current"] = next(sessions)
            return httpx.Response(200, json={"session_id": live["current"], "protocol": 1})
        if request.headers.get(protocol.SESSION_HEADER) != live["current"]:
            return httpx.Response(410, json={"error": "session is unknown or has expired"})
        if path == protocol.EP_GENERATE:
            live["current"] = "forgotten" if request.headers[protocol.SESSION_HEADER] == "s1" else live["current"]
            return httpx.Response(410 if live["current"] == "forgotten" else 200, content=wire.encode(SUPERVISION))
        return httpx.Response(200, json={"status": "ok"})

    remote, recorder = make_remote(server)
    remote.set_vocab_mapping(torch.arange(5), torch.ones(9, dtype=torch.bool))
    batch = remote.generate_batch(torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 3), torch.ones(1, 3))
    assert torch.equal(batch.target_probs, SUPERVISION["target_probs"])
    seen = [(r.url.path, r.headers.get(protocol.SESSION_HEADER)) for r in recorder.requests]
    assert seen == [
        ("/session", None),
        ("/set_vocab_mapping", "s1"),
        ("/generate", "s1"),  # the server has forgotten s1: 410
        ("/session", None),
        ("/set_vocab_mapping", "s2"),  # the mapping is replayed before the retry
        ("/generate", "s2"),
    ]
    assert recorder.requests[4].content == recorder.requests[1].content


def test_connection_errors_are_retried_then_reported_with_url_and_attempts() -> None:
    def down(request: httpx.Request, _n: int) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    remote, recorder = make_remote(down, max_retries=2)
    with pytest.raises(TargetUnreachable, match=r"POST http://target:8001/session failed after 3 attempt\(s\)"):
        remote.model_info()
    assert len(recorder.requests) == 3


def test_timeouts_are_retried_and_reported_as_timeouts() -> None:
    def slow(request: httpx.Request, n: int) -> httpx.Response:
        if n <= 2:
            raise httpx.ReadTimeout("timed out", request=request)
        return httpx.Response(404)

    remote, recorder = make_remote(slow, max_retries=1)
    with pytest.raises(TargetTimeout, match="failed after 2 attempt"):
        remote.model_info()
    remote2, recorder2 = make_remote(slow, max_retries=3)
    remote2._servers[0]._connect()  # third attempt answers: upstream server detected
    assert remote2._servers[0].upstream and len(recorder2.requests) == 3


def test_http_errors_are_not_retried_and_carry_the_server_text() -> None:
    def broken(request: httpx.Request, _n: int) -> httpx.Response:
        return httpx.Response(500, json={"error": "CUDA error: device-side assert"})

    remote, recorder = make_remote(broken)
    with pytest.raises(TargetHTTPError) as info:
        remote.model_info()
    assert info.value.status == 500 and info.value.server_message == "CUDA error: device-side assert"
    assert len(recorder.requests) == 1


def test_503_honours_retry_after_then_gives_up() -> None:
    def busy(request: httpx.Request, _n: int) -> httpx.Response:
        return httpx.Response(503, headers={"Retry-After": "0"}, json={"error": "queue full"})

    remote, recorder = make_remote(busy, max_retries=2)
    with pytest.raises(TargetOverloaded, match="queue full"):
        remote.model_info()
    assert len(recorder.requests) == 3


def test_a_malformed_answer_is_a_protocol_violation() -> None:
    def garbage(request: httpx.Request, _n: int) -> httpx.Response:
        if request.url.path == "/generate":
            return httpx.Response(200, content=b"TEMN" + b"\x01")
        return upstream_server(request, _n)

    remote, _ = make_remote(garbage)
    with pytest.raises(ProtocolViolation, match="malformed wire body"):
        remote.generate_batch(torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 3), torch.ones(1, 3))


def test_missing_supervision_keys_are_a_protocol_violation() -> None:
    def partial(request: httpx.Request, _n: int) -> httpx.Response:
        if request.url.path == "/generate":
            return httpx.Response(200, content=wire.encode({"aux_hidden_states": torch.zeros(1)}))
        return upstream_server(request, _n)

    remote, _ = make_remote(partial)
    with pytest.raises(ProtocolViolation, match="lacks"):
        remote.generate_batch(torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 3), torch.ones(1, 3))


def test_no_ambient_proxy_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.invalid:3128")
    control = ControlPlane("http://127.0.0.1:9")
    assert control._http._mounts == {}  # trust_env=False: no proxy transport mounted
    control.close()


def test_urls_may_be_a_comma_separated_string() -> None:
    remote = RemoteEagle3TargetModel.from_urls("http://a:1, http://b:2/", device="cpu")
    assert remote.urls == ["http://a:1", "http://b:2"] and remote.num_remote_servers == 2
    with pytest.raises(ValueError, match="at least one"):
        RemoteEagle3TargetModel.from_urls([])


def test_json_helpers_round_trip() -> None:
    assert orjson.loads(orjson.dumps({"a": 1})) == {"a": 1}
