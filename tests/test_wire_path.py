"""The wire path against a real appliance process: bit-exact, and buffer reuse never corrupts an answer."""

from __future__ import annotations

import socket
from pathlib import Path

import httpx
import pytest
import torch

from eagle3_appliance.core.inputs import GenerateInputs, VocabMapping
from eagle3_appliance.launch import ServerProcess
from eagle3_appliance.model.loading import load_target
from eagle3_appliance.model.supervision import in_process, supervision_equal
from eagle3_appliance.model.target import Target
from eagle3_appliance.settings import Settings
from eagle3_client import RemoteEagle3TargetModel, protocol, wire
from eagle3_client.synthetic import random_batch, vocab_mapping

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("throughput-cache")


@pytest.fixture(scope="module")
def target(cache_dir: Path) -> Target:
    return load_target(Settings(cache_dir=cache_dir))


@pytest.fixture(scope="module")
def server(cache_dir: Path, target: Target):  # target first: the model folder exists before the server starts
    with ServerProcess(["--cache-dir", str(cache_dir), "--log-level", "WARNING"]) as proc:
        yield proc


def test_held_batches_are_never_overwritten_and_dropped_ones_are_reused(server: ServerProcess, target: Target):
    mapping = VocabMapping(*vocab_mapping(target.logits_size, 200))
    inputs = [random_batch(target.vocab_size, 2, 96, seed=s) for s in range(3)]
    want = [in_process(target, GenerateInputs(*x), mapping) for x in inputs]
    with RemoteEagle3TargetModel.from_urls([server.url], device="cpu", data_plane="wire") as remote:
        remote.set_vocab_mapping(mapping.selected_token_ids, mapping.selected_token_mask)
        first = remote.generate_batch(*inputs[0])
        second = remote.generate_batch(*inputs[1])
        third = remote.generate_batch(*inputs[2])
        assert supervision_equal(first, want[0])  # still intact after two later answers
        assert supervision_equal(second, want[1])
        assert supervision_equal(third, want[2])
        assert first.target_probs.data_ptr() != second.target_probs.data_ptr()
        hits = remote.buffer_pool.stats.hits
        del first, second, third
        again = remote.generate_batch(*inputs[0])
        assert supervision_equal(again, want[0])
        assert remote.buffer_pool.stats.hits > hits  # memory of dropped batches came back


def _read_head(sock: socket.socket) -> tuple[bytes, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        more = sock.recv(4096)
        assert more, "server closed before answering"
        data += more
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


def test_an_answer_still_being_sent_is_not_overwritten_by_later_forwards(server: ServerProcess, target: Target):
    """A stalled reader keeps its answer in flight while other requests run their forwards.

    The answer (20 MB) is far larger than what the kernel buffers for a 64 KiB receive
    window, so its handler is still writing it (flow control) while three more forwards of
    the same shape, which need blocks of exactly the same sizes, run to completion. The
    server must give them other blocks: the stalled body must still be exactly the
    supervision of its own inputs. (That the transport's queued byte views also keep a
    block busy after the handler returns is checked in test_buffers.py.)
    """
    mapping = VocabMapping(*vocab_mapping(target.logits_size, 1024))
    stalled_inputs = random_batch(target.vocab_size, 4, 1024, seed=10)
    other_inputs = random_batch(target.vocab_size, 4, 1024, seed=11)
    want_stalled = in_process(target, GenerateInputs(*stalled_inputs), mapping)
    want_other = in_process(target, GenerateInputs(*other_inputs), mapping)

    # The anonymous (upstream) session gets the mapping, as an upstream client would send it.
    payload = wire.encode(
        {"selected_token_ids": mapping.selected_token_ids, "selected_token_mask": mapping.selected_token_mask}
    )
    assert httpx.post(server.url + "/set_vocab_mapping", content=payload, trust_env=False).status_code == 200

    body = wire.encode(dict(zip(protocol.GENERATE_INPUT_KEYS, stalled_inputs, strict=True)))
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        sock.connect(("127.0.0.1", server.port))
        sock.sendall(
            b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body) + body
        )
        head, start = _read_head(sock)  # the forward is done; the body is only partly sent
        assert head.startswith(b"HTTP/1.1 200")

        with RemoteEagle3TargetModel.from_urls([server.url], device="cpu", data_plane="wire") as remote:
            remote.set_vocab_mapping(mapping.selected_token_ids, mapping.selected_token_mask)
            for _ in range(3):
                assert supervision_equal(remote.generate_batch(*other_inputs), want_other)

        length = int(
            [v for k, _, v in (line.partition(b":") for line in head.split(b"\r\n")) if k.lower() == b"content-length"][
                0
            ]
        )
        assert length > 8 * 1024 * 1024
        reader = wire.WireReader(expected_size=length)
        reader.feed(start)
        stalled = reader.read_from(sock.recv_into)
    for key, expected in want_stalled.items():
        assert torch.equal(stalled[key], expected), key


def test_generate_answers_are_received_by_the_socket_transport(
    server: ServerProcess, target: Target, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The wire plane's /generate must take the recv_into path (a merge once lost it: 3x slower)."""
    from eagle3_client.transports import socketbody

    received: list[int] = []
    real_readinto = socketbody.SocketBody.readinto

    def counting_readinto(self: socketbody.SocketBody, view: memoryview) -> int:
        n = real_readinto(self, view)
        received.append(n)
        return n

    monkeypatch.setattr(socketbody.SocketBody, "readinto", counting_readinto)
    mapping = VocabMapping(*vocab_mapping(target.logits_size, 200))
    inputs = random_batch(target.vocab_size, 2, 64, seed=7)
    with RemoteEagle3TargetModel.from_urls([server.url], device="cpu", data_plane="wire") as remote:
        remote.set_vocab_mapping(mapping.selected_token_ids, mapping.selected_token_mask)
        batch = remote.generate_batch(*inputs)
    assert supervision_equal(batch, in_process(target, GenerateInputs(*inputs), mapping))
    payload = sum(t.numel() * t.element_size() for t in in_process(target, GenerateInputs(*inputs), mapping).values())
    assert sum(received) >= payload  # every tensor byte came through recv_into
