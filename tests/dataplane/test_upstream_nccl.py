"""Upstream's NCCL path (``/init_nccl`` + ``X-NeMo-NCCL: 1``) against a client that builds its
group exactly the way an unmodified upstream client does, with gloo standing in for NCCL.

The client side here is written from sglang's ``init_custom_process_group`` and NeMo
AutoModel's ``NCCLTransport`` (``/work/shared/design/upstream-protocol.md`` section 4), not
from our own transfer code: a ``TCPStore(..., is_master=False, multi_tenant=True)`` handed
unchanged to torch's ``_new_process_group_helper`` under the group name
``nemo_eagle_target_transfer_<port>``, the group registered in torch's world the way sglang
registers it, and one ``torch.distributed.recv`` per tensor from rank 0.
"""

from __future__ import annotations

import datetime
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import Backend, _new_process_group_helper, _world

from eagle3_appliance.core.inputs import VocabMapping
from eagle3_appliance.launch import ServerProcess, free_port
from eagle3_appliance.model.target import Target
from eagle3_client import wire

from .helpers import expected, health, inputs

RENDEZVOUS_S = 120  # upstream's fixed rendezvous timeout
# upstream-protocol.md section 3: the wire's dtype codes, written out from that document on purpose
# (not imported from our codec): this client must not share our code.
DTYPES = {
    0: torch.float32,
    1: torch.float64,
    2: torch.float16,
    3: torch.bfloat16,
    4: torch.int64,
    5: torch.int32,
    6: torch.int16,
    7: torch.int8,
    8: torch.uint8,
    9: torch.bool,
}
AS_BYTES = (torch.int16, torch.int8, torch.bool)  # sent as uint8 views


class UpstreamStyleGroup:
    """Rank 1 of upstream's transfer group, built the way sglang builds it from a given store."""

    def __init__(self, host: str, port: int, backend: str) -> None:
        self.name = f"nemo_eagle_target_transfer_{port}"
        self.host, self.port, self.backend = host, port, backend
        self.pg: Any = None
        self.error: BaseException | None = None

    def join(self) -> None:
        """What upstream's client runs on a thread while it posts /init_nccl."""
        timeout = datetime.timedelta(seconds=RENDEZVOUS_S)
        try:
            store = dist.TCPStore(
                self.host, self.port, world_size=2, is_master=False, timeout=timeout, multi_tenant=True
            )
            # sglang: given a store, no PrefixStore of its own; the helper adds the nesting.
            pg, _ = _new_process_group_helper(
                2, 1, [], Backend(self.backend), store, group_name=self.name, backend_options=None, timeout=timeout
            )
            _world.pg_group_ranks[pg] = {0: 0, 1: 1}
            self.pg = pg
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            self.error = exc

    def receive(self, metadata: dict[str, Any]) -> dict[str, torch.Tensor]:
        """One ``dist.recv`` per non-null entry in ``keys_order``, int16/int8/bool as uint8."""
        out = {}
        for key in metadata["keys_order"]:
            spec = metadata["metadata"][key]
            if spec is None:
                continue
            dtype, shape = DTYPES[spec["dtype_code"]], tuple(spec["shape"])
            if dtype in AS_BYTES:
                numel = 1
                for d in shape:
                    numel *= d
                buf = torch.empty(numel * torch.empty(0, dtype=dtype).element_size(), dtype=torch.uint8)
                dist.recv(buf, src=0, group=self.pg)
                out[key] = buf.view(dtype).reshape(shape)
            else:
                buf = torch.empty(shape, dtype=dtype)
                dist.recv(buf, src=0, group=self.pg)
                out[key] = buf
        return out

    def destroy(self) -> None:
        """Upstream's teardown: drop the group from torch's registry without a collective."""
        pg, self.pg = self.pg, None
        if pg is None:
            return
        name = _world.pg_names.get(pg)
        for table in (
            _world.pg_map,
            _world.pg_names,
            _world.pg_group_ranks,
            _world.pg_backend_config,
            _world.pg_to_tag,
        ):
            table.pop(pg, None)
        for groups in _world.tags_to_pg.values():
            while pg in groups:
                groups.remove(pg)
        if name is not None:
            from torch.distributed.distributed_c10d import _unregister_process_group

            _unregister_process_group(name)


@pytest.fixture(scope="module")
def gloo_upstream_server(dp_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """An appliance on the CPU whose /init_nccl builds upstream's group on gloo (the test switch)."""
    args = ["--cache-dir", str(dp_cache), "--upstream-nccl-on-gloo"]
    with ServerProcess(args, log_path=tmp_path_factory.mktemp("upstream-nccl") / "server.log") as proc:
        yield proc


def _mapping_body(mapping: VocabMapping) -> bytes:
    return wire.encode(
        {"selected_token_ids": mapping.selected_token_ids, "selected_token_mask": mapping.selected_token_mask}
    )


def _init(http: httpx.Client, port: int) -> tuple[str, UpstreamStyleGroup]:
    """Upstream's client: start joining on a thread, then ask the server over HTTP."""
    group = UpstreamStyleGroup("127.0.0.1", port, "gloo")
    joiner = threading.Thread(target=group.join, daemon=True)
    joiner.start()
    status = http.post("/init_nccl", json={"nccl_port": port}).json()["status"]
    joiner.join(timeout=RENDEZVOUS_S + 30)
    return status, group


def test_an_upstream_client_built_like_sglang_gets_bit_exact_answers_on_the_group(
    gloo_upstream_server: ServerProcess, reference: Target, mapping: VocabMapping
) -> None:
    port = free_port()
    with httpx.Client(base_url=gloo_upstream_server.url, trust_env=False, timeout=180) as http:
        status, group = _init(http, port)
        try:
            assert status == "ok" and group.error is None and group.pg is not None, (status, group.error)
            assert http.post("/set_vocab_mapping", content=_mapping_body(mapping)).json() == {"status": "ok"}
            for seed in range(3):
                batch_inputs = inputs(reference, 2, 24 + 8 * seed, seed=900 + seed)
                body = wire.encode(dict(zip(("input_ids", "attention_mask", "loss_mask"), batch_inputs, strict=True)))
                resp = http.post(
                    "/generate", content=body, headers={"X-NeMo-NCCL": "1", "Content-Type": "application/octet-stream"}
                )
                assert resp.status_code == 200, resp.text
                assert resp.headers.get("X-NeMo-NCCL") == "1"
                assert resp.headers["content-type"].startswith("application/json")
                metadata = orjson.loads(resp.content)
                got = group.receive(metadata)
                want = expected(reference, mapping, batch_inputs)
                assert list(got) == list(want)
                for key, value in want.items():
                    assert got[key].dtype == value.dtype and torch.equal(got[key], value), key
            # A second trainer rank asking for a group while this one is live is sent to the wire,
            # not paired with this rank's group.
            assert http.post("/init_nccl", json={"nccl_port": free_port()}).json() == {"status": "failed"}
            batch_inputs = inputs(reference, 1, 16, seed=950)
            body = wire.encode(dict(zip(("input_ids", "attention_mask", "loss_mask"), batch_inputs, strict=True)))
            resp = http.post("/generate", content=body, headers={"X-NeMo-NCCL": "1"})
            assert resp.headers.get("X-NeMo-NCCL") == "1"  # the first group still serves its owner
            got = group.receive(orjson.loads(resp.content))
            for key, value in expected(reference, mapping, batch_inputs).items():
                assert torch.equal(got[key], value), key
            assert http.post("/disconnect", json={}).json() == {"status": "ok"}
        finally:
            group.destroy()
    assert health(gloo_upstream_server.url) == 200


def test_after_an_upstream_client_leaves_the_next_one_gets_a_group(
    gloo_upstream_server: ServerProcess, reference: Target, mapping: VocabMapping
) -> None:
    """``/disconnect`` drops the group (and torch's registration of its name), so a new one can form."""
    port = free_port()
    for _ in range(2):
        with httpx.Client(base_url=gloo_upstream_server.url, trust_env=False, timeout=180) as http:
            status, group = _init(http, port)
            try:
                assert status == "ok" and group.pg is not None, (status, group.error)
                http.post("/set_vocab_mapping", content=_mapping_body(mapping))
                batch_inputs = inputs(reference, 1, 12, seed=960)
                body = wire.encode(dict(zip(("input_ids", "attention_mask", "loss_mask"), batch_inputs, strict=True)))
                resp = http.post("/generate", content=body, headers={"X-NeMo-NCCL": "1"})
                got = group.receive(orjson.loads(resp.content))
                for key, value in expected(reference, mapping, batch_inputs).items():
                    assert torch.equal(got[key], value), key
                http.post("/disconnect", json={})
            finally:
                group.destroy()
