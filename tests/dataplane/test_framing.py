"""The group framing (eagle3_client.transports.transfer) between two real gloo ranks: exact bytes, checked headers."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from eagle3_client import protocol
from eagle3_client.transports.transfer import (
    PROOF_BYTES,
    Group,
    JoinRejected,
    RendezvousStore,
    TransferDesync,
    TransferMetadata,
    TransferTimeout,
    check_proof,
    connect_store,
    host_store,
    open_group,
    recv_transfer,
    send_proof,
    send_transfer,
)

TIMEOUT = 20.0


@pytest.fixture
def pair() -> Iterator[tuple[Group, Group]]:
    """Rank 0 and rank 1 of one private gloo group, in this process (rank 0 built on a thread)."""
    store = host_store("127.0.0.1", 0, TIMEOUT)
    box: dict[str, Group] = {}
    server = threading.Thread(target=lambda: box.update(g=open_group("gloo", store, 0, TIMEOUT, torch.device("cpu"))))
    server.start()
    client = open_group("gloo", connect_store("127.0.0.1", int(store.port), TIMEOUT), 1, TIMEOUT, torch.device("cpu"))
    server.join()
    yield box["g"], client
    box["g"].close()
    client.close()


def in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["value"] = fn()
        except Exception as exc:  # noqa: BLE001 - handed to the test
            out["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    return thread, out


def sample_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {
        "bf16": torch.randn(3, 5, 7, generator=g).to(torch.bfloat16),
        "f32": torch.randn(2, 9, 11, generator=g),
        "mask": torch.rand(2, 9, 1, generator=g) > 0.5,
        "i64": torch.randint(-(2**40), 2**40, (2, 9), generator=g),
        "i16": torch.randint(-300, 300, (4,), generator=g).to(torch.int16),
        "empty": torch.empty(0, 3),
    }


def test_every_dtype_arrives_bit_exact(pair: tuple[Group, Group]) -> None:
    server, client = pair
    tensors = sample_tensors()
    meta = TransferMetadata.describe(41, "gloo", tensors)
    sender, sent = in_thread(lambda: send_transfer(server, 41, list(tensors.values()), TIMEOUT))
    got = recv_transfer(client, TransferMetadata.from_json(meta.to_json()), TIMEOUT)
    sender.join()
    assert sent["value"] == meta.total_bytes
    assert list(got) == list(tensors)
    for key, want in tensors.items():
        assert got[key].dtype == want.dtype and got[key].shape == want.shape
        assert torch.equal(got[key], want), key


def test_header_mismatch_is_caught_before_any_tensor_is_used(pair: tuple[Group, Group]) -> None:
    server, client = pair
    tensors = sample_tensors()
    # The HTTP answer claims one more row of f32 than the group will carry.
    claimed = dict(tensors, f32=torch.empty(3, 9, 11))
    sender, _ = in_thread(lambda: send_transfer(server, 7, list(tensors.values()), 5.0))
    with pytest.raises(TransferDesync, match=r"header .* expected"):
        recv_transfer(client, TransferMetadata.describe(7, "gloo", claimed), TIMEOUT)
    client.close()  # what the client does after any failure; the sender's next send then fails
    sender.join()


def test_transfers_of_other_sequence_numbers_are_never_matched(pair: tuple[Group, Group]) -> None:
    server, client = pair
    tensors = {"x": torch.arange(10.0)}
    sender, _ = in_thread(lambda: send_transfer(server, 8, list(tensors.values()), 5.0))
    # Waiting for transfer 9 while 8 is on the group: the tag keeps them apart; we time out.
    with pytest.raises(TransferTimeout):
        recv_transfer(client, TransferMetadata.describe(9, "gloo", tensors), 1.0)
    client.close()
    sender.join()


def test_metadata_json_is_validated() -> None:
    meta = TransferMetadata.describe(5, "gloo", sample_tensors())
    body = meta.to_json()
    assert body["keys_order"] == list(sample_tensors())
    assert body["metadata"]["bf16"] == {"dtype_code": 3, "shape": [3, 5, 7]}
    assert TransferMetadata.from_json(body) == meta
    with pytest.raises(ValueError, match="total_bytes"):
        TransferMetadata.from_json({**body, "total_bytes": body["total_bytes"] + 1})
    with pytest.raises(ValueError, match="malformed"):
        TransferMetadata.from_json({k: v for k, v in body.items() if k != "keys_order"})
    with pytest.raises(ValueError, match="negative"):
        TransferMetadata.from_json({**body, "metadata": {**body["metadata"], "f32": {"dtype_code": 0, "shape": [-1]}}})
    assert protocol.TRANSFER_MAGIC == 0x45334450


def test_upstream_framing_sends_each_tensor_in_key_order_with_small_types_as_bytes(pair: tuple[Group, Group]) -> None:
    """The server half of upstream's NCCL path, run over gloo: what an upstream client receives."""
    from eagle3_appliance.dataplanes.upstream_nccl import upstream_frame

    server, client = pair
    g = torch.Generator().manual_seed(11)
    supervision = {
        "aux_hidden_states": torch.randn(2, 5, 12, generator=g),
        "target_probs": torch.rand(2, 5, 7, generator=g),
        "position_mask": torch.rand(2, 5, 1, generator=g) > 0.5,
        "input_ids": torch.randint(0, 100, (2, 5), generator=g),
        "loss_mask": torch.randint(0, 2, (2, 5), generator=g).to(torch.int16),
    }
    sender, sent = in_thread(lambda: upstream_frame(server, 0, supervision, TIMEOUT))
    got = {}
    for key in protocol.SUPERVISION_KEYS:  # as upstream's client receives them: tag 0, one message each
        want = supervision[key]
        if want.dtype in (torch.bool, torch.int8, torch.int16):
            buf = torch.empty(want.numel() * want.element_size(), dtype=torch.uint8)
            client.pg.recv([buf], 0, 0).wait()
            got[key] = buf.view(want.dtype).reshape(want.shape)
        else:
            buf = torch.empty(want.shape, dtype=want.dtype)
            client.pg.recv([buf], 0, 0).wait()
            got[key] = buf
    sender.join()
    assert sent["value"] == sum(t.numel() * t.element_size() for t in supervision.values())
    for key, want in supervision.items():
        assert torch.equal(got[key], want), key


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_a_group_built_through_a_rendezvous_store_frees_the_port_once_it_is_detached() -> None:
    """A process group holds its store for life; through the wrapper the port goes when we say so."""
    tcp = host_store("127.0.0.1", 0, TIMEOUT)
    port = int(tcp.port)
    store = RendezvousStore(tcp, TIMEOUT)
    del tcp
    box: dict[str, Group] = {}
    server = threading.Thread(target=lambda: box.update(g=open_group("gloo", store, 0, TIMEOUT, torch.device("cpu"))))
    server.start()
    client = open_group("gloo", connect_store("127.0.0.1", port, TIMEOUT), 1, TIMEOUT, torch.device("cpu"))
    server.join()
    try:
        assert not _bindable(port)  # the group is up and the store still listens
        store.detach()
        assert _bindable(port)
        sender = threading.Thread(target=send_transfer, args=(box["g"], 7, [torch.arange(5)]))
        sender.start()  # the group works without its store
        got = recv_transfer(client, TransferMetadata(7, "gloo", (("x", torch.int64, (5,)),)))
        sender.join()
        assert torch.equal(got["x"], torch.arange(5))
    finally:
        box["g"].close()
        client.close()


def test_detaching_a_rendezvous_store_ends_a_waiting_rendezvous_at_once() -> None:
    store = RendezvousStore(host_store("127.0.0.1", 0, TIMEOUT), TIMEOUT)
    outcome: dict[str, Any] = {}

    def rank0() -> None:
        start = time.monotonic()
        try:
            open_group("gloo", store, 0, TIMEOUT, torch.device("cpu"))
        except RuntimeError as exc:
            outcome["error"], outcome["after"] = str(exc), time.monotonic() - start

    waiting = threading.Thread(target=rank0)
    waiting.start()
    time.sleep(0.5)  # waiting for a peer that never comes (for up to TIMEOUT = 20 s)
    store.detach()
    waiting.join(timeout=TIMEOUT)
    assert "rendezvous store is closed" in outcome["error"], outcome
    assert outcome["after"] < TIMEOUT / 2, outcome
    assert not store.check(["anything"])  # background pollers see "not there", not an error


@pytest.mark.parametrize("right", [True, False])
def test_the_join_proof_admits_the_owner_and_rejects_anyone_else(pair: tuple[Group, Group], right: bool) -> None:
    server, client = pair
    secret = bytes(range(PROOF_BYTES))
    sent = secret if right else bytes(PROOF_BYTES)
    threading.Thread(target=send_proof, args=(client, 99, sent, TIMEOUT)).start()
    if right:
        check_proof(server, 99, secret, TIMEOUT)
    else:
        with pytest.raises(JoinRejected, match="does not match"):
            check_proof(server, 99, secret, TIMEOUT)


def test_a_peer_that_sends_no_proof_is_rejected_at_the_proof_deadline(pair: tuple[Group, Group]) -> None:
    server, _ = pair
    with pytest.raises(JoinRejected, match="sent no join proof"):
        check_proof(server, 5, bytes(PROOF_BYTES), 0.5)
