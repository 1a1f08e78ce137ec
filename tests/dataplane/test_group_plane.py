"""Our client and our server over a real gloo group (two processes): exact, negotiated, observable."""

from __future__ import annotations

import threading
from pathlib import Path

import httpx
import pytest
import torch

from eagle3_appliance.core.inputs import VocabMapping
from eagle3_appliance.launch import ServerProcess
from eagle3_appliance.model.target import Target
from eagle3_client import DataPlaneUnavailable, protocol, wire
from eagle3_client.transports.transfer import PROOF_BYTES

from .helpers import assert_bit_exact, connect, expected, health, inputs, session_id, status

SHAPES = [(2, 64), (1, 17), (3, 40), (2, 128), (1, 1), (2, 33)]


def test_gloo_answers_equal_the_wire_and_the_reference_bit_for_bit(
    dp_server: ServerProcess, reference: Target, mapping: VocabMapping
) -> None:
    with (
        connect(dp_server.url, mapping, data_plane="gloo") as group,
        connect(dp_server.url, mapping, data_plane="wire") as plain,
    ):
        total = 0
        for i in range(12):
            batch_inputs = inputs(reference, *SHAPES[i % len(SHAPES)], seed=100 + i)
            want = expected(reference, mapping, batch_inputs)
            over_group = group.generate_batch(*batch_inputs)
            over_wire = plain.generate_batch(*batch_inputs)
            assert_bit_exact(over_group, want)
            assert_bit_exact(over_wire, want)
            total += sum(t.numel() * t.element_size() for t in want.values())
        stats = group.transport_stats()[0]
        assert (stats["tier"], stats["negotiated"], stats["requests"]) == ("gloo", "gloo", 12)
        assert stats["bytes"] == {"nccl": 0, "gloo": total, "wire": 0}
        assert (stats["fallbacks"], stats["reupgrades"]) == (0, 0)
        assert plain.transport_stats()[0]["bytes"] == {"nccl": 0, "gloo": 0, "wire": total}
        mine = status(dp_server.url, session_id(group))["session"]
        assert (mine["tier"], mine["state"], mine["transfers"], mine["port"]) == ("gloo", "ready", 12, stats["port"])
    # Closing the client ends its session, and the server releases the group with it.
    assert stats["port"] not in [link["port"] for link in status(dp_server.url)["links"]]


def test_auto_takes_the_wire_on_cpu_and_the_environment_can_force_gloo(
    dp_server: ServerProcess, reference: Target, mapping: VocabMapping, monkeypatch: pytest.MonkeyPatch
) -> None:
    batch_inputs = inputs(reference, 1, 24, seed=5)
    want = expected(reference, mapping, batch_inputs)
    with connect(dp_server.url, mapping) as remote:
        assert_bit_exact(remote.generate_batch(*batch_inputs), want)
        stats = remote.transport_stats()[0]
        assert (stats["tier"], stats["negotiated"], stats["bytes"]["gloo"], stats["port"]) == ("wire", "wire", 0, None)
    monkeypatch.setenv("EAGLE3_DATA_PLANE", "gloo")
    with connect(dp_server.url, mapping) as remote:
        assert_bit_exact(remote.generate_batch(*batch_inputs), want)
        stats = remote.transport_stats()[0]
        assert (stats["tier"], stats["negotiated"], stats["bytes"]["wire"]) == ("gloo", "gloo", 0)


def test_forcing_nccl_on_a_cpu_pair_is_a_clear_error_at_connect(dp_server: ServerProcess) -> None:
    from eagle3_client import RemoteEagle3TargetModel

    remote = RemoteEagle3TargetModel.from_urls([dp_server.url], data_plane="nccl")
    with pytest.raises(DataPlaneUnavailable, match="nccl"):
        remote.model_info()
    remote.close()
    assert status(dp_server.url)["offered"] == ["gloo", "wire"]


def test_four_clients_each_get_their_own_group_and_their_own_answers_in_order(
    dp_server: ServerProcess, reference: Target, mapping: VocabMapping
) -> None:
    clients, rounds = 4, 3
    # Each client has its own sequence length, so a crossed answer could not even have the right shape.
    plan = {c: [inputs(reference, 1 + c % 2, 20 + 7 * c, seed=1000 * c + r) for r in range(rounds)] for c in range(4)}
    want = {c: [expected(reference, mapping, b) for b in plan[c]] for c in range(clients)}
    results: dict[int, list[dict[str, torch.Tensor]]] = {}
    ports: dict[int, int] = {}
    errors: list[BaseException] = []
    all_up = threading.Barrier(clients)
    done = threading.Semaphore(0)
    release = threading.Event()

    def rank(c: int) -> None:
        try:
            with connect(dp_server.url, mapping, data_plane="gloo") as remote:
                remote.generate_batch(*plan[c][0])  # brings the group up
                ports[c] = remote.transport_stats()[0]["port"]
                all_up.wait(timeout=120)  # every group is up before the rounds start
                got = []
                for r in range(rounds):
                    batch = remote.generate_batch(*plan[c][r])
                    got.append({k: getattr(batch, k) for k in want[c][r]})
                results[c] = got
                assert remote.transport_stats()[0]["fallbacks"] == 0
                done.release()
                release.wait(timeout=120)  # stay connected until the server's status has been read
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            errors.append(exc)
            all_up.abort()
            done.release()

    threads = [threading.Thread(target=rank, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    try:
        for _ in range(clients):
            assert done.acquire(timeout=300)
        assert not errors, errors
        links = [lk for lk in status(dp_server.url)["links"] if lk["port"] in ports.values()]
        assert len(set(ports.values())) == clients
        assert sorted(lk["port"] for lk in links) == sorted(ports.values())
        assert all(lk["state"] == "ready" and lk["transfers"] == rounds + 1 for lk in links), links
    finally:
        release.set()
        for t in threads:
            t.join(timeout=120)
    assert not errors, errors
    for c in range(clients):
        for r in range(rounds):
            for key, value in want[c][r].items():
                assert torch.equal(results[c][r][key], value), (c, r, key)


def test_an_upstream_client_still_gets_upstream_behaviour(
    dp_server: ServerProcess, reference: Target, mapping: VocabMapping
) -> None:
    batch_inputs = inputs(reference, 2, 16, seed=9)
    with httpx.Client(base_url=dp_server.url, trust_env=False, timeout=60) as http:
        # No session header: the anonymous session, exactly as upstream's client talks.
        assert http.post("/init_nccl", json={"nccl_port": 1}).json() == {"status": "disabled"}
        body = wire.encode(
            {"selected_token_ids": mapping.selected_token_ids, "selected_token_mask": mapping.selected_token_mask}
        )
        assert http.post("/set_vocab_mapping", content=body).json() == {"status": "ok"}
        keys = ("input_ids", "attention_mask", "loss_mask")
        resp = http.post(
            "/generate", content=wire.encode(dict(zip(keys, batch_inputs, strict=True))), headers={"X-NeMo-NCCL": "1"}
        )
        assert resp.status_code == 200
        assert protocol.NCCL_HEADER not in resp.headers and resp.headers["content-type"] == protocol.OCTET_STREAM
        got = wire.decode(resp.content)
        assert list(got) == list(protocol.SUPERVISION_KEYS)
        for key, want in expected(reference, mapping, batch_inputs).items():
            assert torch.equal(got[key], want), key
        # Our extension needs a session: an anonymous caller is told so.
        refused = http.post("/data_plane", json={"tier": "gloo"})
        assert refused.status_code == 409 and "POST /session" in refused.json()["error"]
    assert health(dp_server.url) == 200


def test_bad_data_plane_requests_get_clear_errors(dp_server: ServerProcess) -> None:
    with httpx.Client(base_url=dp_server.url, trust_env=False, timeout=30) as http:
        sid = http.post("/session", json={"client": "t", "data_planes": ["gloo", "wire"]}).json()["session_id"]
        h = {protocol.SESSION_HEADER: sid}
        assert http.post("/data_plane", json={"tier": "carrier-pigeon"}, headers=h).status_code == 422
        nccl = http.post("/data_plane", json={"tier": "nccl"}, headers=h)
        assert nccl.status_code == 409 and "offers ['gloo', 'wire']" in nccl.json()["error"]
        assert http.post("/data_plane", content=b"{", headers=h).status_code == 400
        resend = http.post("/data_plane/resend", json={"seq": 3}, headers=h)
        assert resend.status_code == 409 and "no stored result for transfer 3" in resend.json()["error"]
        assert http.post("/data_plane", json={"tier": "wire"}, headers=h).json() == {"tier": "wire"}
        http.post("/disconnect", json={}, headers=h)


def test_a_join_without_the_proof_is_refused_and_opens_no_rendezvous(dp_server: ServerProcess) -> None:
    with httpx.Client(base_url=dp_server.url, trust_env=False, timeout=30) as http:
        sid = http.post("/session", json={"client": "old", "data_planes": ["gloo", "wire"]}).json()["session_id"]
        h = {protocol.SESSION_HEADER: sid}
        refused = http.post("/data_plane", json={"tier": "gloo"}, headers=h)
        assert refused.status_code == 422 and '"proof": true' in refused.json()["error"]
        assert status(dp_server.url, sid)["session"] == {"tier": "wire", "state": "none"}
        proven = http.post("/data_plane", json={"tier": "gloo", "proof": True}, headers=h)
        assert proven.status_code == 200 and len(bytes.fromhex(proven.json()["secret"])) == PROOF_BYTES
        http.post("/data_plane", json={"tier": "wire"}, headers=h)
        http.post("/disconnect", json={}, headers=h)


def test_joins_without_the_proof_are_let_in_only_when_allowed_and_that_is_logged(
    dp_cache: Path, tmp_path: Path
) -> None:
    args = ["--cache-dir", str(dp_cache), "--allow-unproven-joins"]
    with ServerProcess(args, log_path=tmp_path / "server.log") as server:
        with httpx.Client(base_url=server.url, trust_env=False, timeout=30) as http:
            sid = http.post("/session", json={"client": "old", "data_planes": ["gloo", "wire"]}).json()["session_id"]
            h = {protocol.SESSION_HEADER: sid}
            reply = http.post("/data_plane", json={"tier": "gloo"}, headers=h)
            assert reply.status_code == 200 and reply.json()["tier"] == "gloo" and "secret" not in reply.json()
            http.post("/data_plane", json={"tier": "wire"}, headers=h)
    assert (
        "--allow-unproven-joins: clients may join a data-plane group without proving"
        in (tmp_path / "server.log").read_text()
    )


@pytest.mark.parametrize("encoding", ["logits", "hidden"])
def test_every_encoding_travels_over_gloo_as_over_the_wire_with_auth_on(
    dp_cache: Path, reference: Target, mapping: VocabMapping, tmp_path: Path, encoding: str
) -> None:
    """The group moves whatever keys the negotiated encoding has, on a token-protected server."""
    token = "s3cret-token"
    args = ["--cache-dir", str(dp_cache), "--auth-token", token]
    with ServerProcess(args, log_path=tmp_path / "server.log") as server:
        opts = dict(encoding=encoding, token=token)
        with (
            connect(server.url, mapping, data_plane="gloo", **opts) as group,
            connect(server.url, mapping, data_plane="wire", **opts) as plain,
        ):
            for seed in range(3):
                batch_inputs = inputs(reference, 2, 24, seed=700 + seed)
                a, b = group.generate_batch(*batch_inputs), plain.generate_batch(*batch_inputs)
                for key in protocol.SUPERVISION_KEYS:
                    assert torch.equal(getattr(a, key), getattr(b, key)), key
            stats = group.transport_stats()[0]
            assert (stats["tier"], stats["fallbacks"], stats["bytes"]["wire"]) == ("gloo", 0, 0)
            assert group.encoding_stats()["negotiated"][server.url] == encoding
        # Without the token the data-plane endpoints are closed like every other one.
        assert httpx.post(server.url + "/data_plane", json={"tier": "gloo"}, trust_env=False).status_code == 401
