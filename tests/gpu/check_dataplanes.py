"""GPU check of the data planes, end to end: a real appliance process and the real client.

Run on a GPU machine (not collected by pytest)::

    python tests/gpu/check_dataplanes.py [--batches 4] [--seq-len 512]

* Two or more GPUs visible: the server runs on GPU 0 (``CUDA_VISIBLE_DEVICES=0``) and this
  process receives on GPU 1 (NCCL cannot pair two ranks on one GPU). Checks our ``nccl``
  tier (answers land on ``cuda:1`` and equal the wire answers of the same server bit for
  bit), recovery on NCCL (the server drops the group, the answer comes over the wire, the
  client re-upgrades) and upstream's ``/init_nccl`` + ``X-NeMo-NCCL`` framing, driven the
  way an upstream client drives it.
* One GPU: server and client share it. Checks the CUDA-tensor wire path and the gloo tier
  with a CUDA trainer, both bit-exact against the same model run in this process.
* No GPU: says so and exits 0.

Exit code 0 when every check passed. Prints one line per check.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
from pathlib import Path

import httpx
import orjson
import torch

from eagle3_appliance.core.inputs import GenerateInputs, Packing, VocabMapping
from eagle3_appliance.launch import ServerProcess
from eagle3_appliance.model.builtin_model import ensure_builtin_model
from eagle3_appliance.model.loading import load_target
from eagle3_appliance.model.supervision import in_process
from eagle3_appliance.settings import Device, Settings
from eagle3_client import RemoteEagle3TargetModel, protocol, wire
from eagle3_client.synthetic import packed_batch, random_batch, vocab_mapping

KEYS = protocol.SUPERVISION_KEYS
FAILED: list[str] = []


def check(name: str, ok: bool, detail: str = "") -> None:
    print(f"[{'PASS' if ok else 'FAIL'}] {name}{'  ' + detail if detail else ''}", flush=True)
    if not ok:
        FAILED.append(name)


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(a[k].dtype == b[k].dtype and torch.equal(a[k].cpu(), b[k].cpu()) for k in KEYS)


def as_dict(batch: object) -> dict[str, torch.Tensor]:
    return {k: getattr(batch, k) for k in KEYS}


def fetch(remote: RemoteEagle3TargetModel, batch):  # type: ignore[no-untyped-def]
    """One batch: a tuple (input_ids, attention_mask, loss_mask), or a packed batch's dict of keywords."""
    return remote.generate_batch(**batch) if isinstance(batch, dict) else remote.generate_batch(*batch)


def inputs_of(batch) -> GenerateInputs:  # type: ignore[no-untyped-def]
    if not isinstance(batch, dict):
        return GenerateInputs(*batch)
    packing = Packing(batch["position_ids"], batch["seq_lens"], batch["doc_remaining"])
    return GenerateInputs(batch["input_ids"], batch["attention_mask"], batch["loss_mask"], packing)


def run_tier(url: str, tier: str, device: str, mapping, batches, **options) -> tuple[list, dict]:
    with RemoteEagle3TargetModel.from_urls([url], device=device, data_plane=tier, **options) as remote:
        remote.set_vocab_mapping(mapping.selected_token_ids, mapping.selected_token_mask)
        answers = [as_dict(fetch(remote, b)) for b in batches]
        return answers, remote.transport_stats()[0]


def rate(stats: dict, tier: str) -> str:
    seconds = stats["transfer_seconds"][tier]
    return f"{stats['bytes'][tier] / 1e6:.1f} MB in {seconds:.3f} s ({stats['bytes'][tier] / 1e6 / seconds:.0f} MB/s)"


def two_gpus(url: str, mapping, batches) -> None:
    wire_answers, wire_stats = run_tier(url, "wire", "cuda:1", mapping, batches)
    nccl_answers, stats = run_tier(url, "nccl", "cuda:1", mapping, batches)
    on_gpu1 = all(t.device == torch.device("cuda:1") for a in nccl_answers for t in a.values())
    check("nccl tier negotiated and used", stats["tier"] == "nccl" and stats["fallbacks"] == 0, str(stats))
    check("nccl answers land on cuda:1", on_gpu1)
    check(
        "nccl answers == wire answers, bit for bit",
        all(same(a, b) for a, b in zip(nccl_answers, wire_answers, strict=True)),
        f"nccl {rate(stats, 'nccl')}; wire {rate(wire_stats, 'wire')}",
    )
    # Recovery: the server drops the group; the next answer comes over the wire; then NCCL again.
    with RemoteEagle3TargetModel.from_urls([url], device="cuda:1", data_plane="nccl", data_plane_backoff=0) as remote:
        remote.set_vocab_mapping(mapping.selected_token_ids, mapping.selected_token_mask)
        first = as_dict(remote.generate_batch(*batches[0]))
        sid = remote._servers[0].session_id
        httpx.post(url + "/data_plane", json={"tier": "wire"}, headers={protocol.SESSION_HEADER: sid}, timeout=30)
        second = as_dict(remote.generate_batch(*batches[1]))
        third = as_dict(remote.generate_batch(*batches[0]))
        s = remote.transport_stats()[0]
    check(
        "nccl recovery: dropped group -> wire -> re-upgrade, all bit-exact",
        (s["fallbacks"], s["reupgrades"], s["tier"]) == (1, 1, "nccl")
        and same(first, wire_answers[0])
        and same(second, wire_answers[1])
        and same(third, wire_answers[0]),
        str(s),
    )
    upstream_nccl_client(url, mapping, batches[0], wire_answers[0])


def upstream_style_group(port: int, device: torch.device) -> object:
    """Rank 1 of upstream's group, built as upstream's client builds it (sglang's way with a given store)."""
    import datetime

    import torch.distributed as dist
    from torch.distributed.distributed_c10d import Backend, _new_process_group_helper, _world

    timeout = datetime.timedelta(seconds=120)
    torch.cuda.set_device(device)
    store = dist.TCPStore("127.0.0.1", port, world_size=2, is_master=False, timeout=timeout, multi_tenant=True)
    name = f"{protocol.UPSTREAM_NCCL_GROUP_PREFIX}{port}"
    pg, _ = _new_process_group_helper(
        2, 1, [], Backend("nccl"), store, group_name=name, backend_options=None, timeout=timeout
    )
    _world.pg_group_ranks[pg] = {0: 0, 1: 1}
    return pg


def upstream_nccl_client(url: str, mapping, batch, want: dict[str, torch.Tensor]) -> None:
    """Drive /init_nccl and X-NeMo-NCCL exactly as upstream's client does (no session header)."""
    import torch.distributed as dist

    port = int(url.rsplit(":", 1)[1]) + 100
    device = torch.device("cuda:1")
    http = httpx.Client(base_url=url, trust_env=False, timeout=180)
    box: dict = {}
    join = threading.Thread(target=lambda: box.update(pg=upstream_style_group(port, device)), daemon=True)
    join.start()  # upstream joins on a thread while it asks the server over HTTP
    reply = http.post("/init_nccl", json={"nccl_port": port}).json()
    join.join(timeout=150)
    check("upstream /init_nccl answers ok", reply.get("status") == "ok" and "pg" in box, str(reply))
    if reply.get("status") != "ok" or "pg" not in box:
        return
    pg = box["pg"]
    http.post(
        "/set_vocab_mapping",
        content=wire.encode(
            {"selected_token_ids": mapping.selected_token_ids, "selected_token_mask": mapping.selected_token_mask}
        ),
    )
    body = wire.encode(dict(zip(protocol.GENERATE_INPUT_KEYS, batch, strict=True)))
    resp = http.post("/generate", content=body, headers={protocol.NCCL_HEADER: "1"})
    echoed = resp.headers.get(protocol.NCCL_HEADER) == "1"
    check("upstream /generate echoes X-NeMo-NCCL and sends metadata", echoed, resp.headers.get("content-type", ""))
    if not echoed:
        return
    meta = orjson.loads(resp.content)
    got = {}
    for key in meta["keys_order"]:
        spec = meta["metadata"][key]
        dtype, shape = wire.CODE_TO_DTYPE[spec["dtype_code"]], spec["shape"]
        if dtype in (torch.int16, torch.int8, torch.bool):
            nbytes = torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size()
            buf = torch.empty(nbytes, dtype=torch.uint8, device=device)
            dist.recv(buf, src=0, group=pg)
            got[key] = buf.view(dtype).reshape(shape)
        else:
            buf = torch.empty(shape, dtype=dtype, device=device)
            dist.recv(buf, src=0, group=pg)
            got[key] = buf
    torch.cuda.synchronize(device)
    check("upstream NCCL framing == wire answer, bit for bit", same(got, want))
    second = http.post("/init_nccl", json={"nccl_port": port + 1}).json()
    check("a second /init_nccl while the group is live answers failed", second == {"status": "failed"}, str(second))
    http.post("/disconnect", json={})
    try:
        pg.abort()
    except Exception:  # noqa: BLE001 - best effort, as upstream's own teardown
        pass
    http.close()


def one_gpu(url: str, cache: Path, mapping, batches) -> None:
    reference = load_target(Settings(device=Device.cuda, cache_dir=cache))
    want = [in_process(reference, inputs_of(b), mapping) for b in batches]
    for tier in ("wire", "gloo"):
        answers, stats = run_tier(url, tier, "cuda", mapping, batches)
        on_gpu = all(t.is_cuda for a in answers for t in a.values())
        exact = all(same(a, w) for a, w in zip(answers, want, strict=True))
        check(
            f"{tier} tier with a CUDA trainer: answers on cuda, == in-process reference",
            on_gpu and exact,
            rate(stats, tier),
        )
    print("(nccl needs a second GPU: NCCL cannot pair two ranks on one GPU)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=512)
    args = parser.parse_args()
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    nccl = torch.distributed.is_nccl_available()
    print(f"== data-plane GPU check: {count} GPU(s) visible, torch {torch.__version__}, nccl={nccl}")
    if count == 0:
        print("no GPU visible: nothing to check here (the CPU tests cover gloo and the wire)")
        return 0
    cache = Path(tempfile.mkdtemp(prefix="eagle3-gpu-check-"))
    ensure_builtin_model(cache)
    reference_vocab = 1024
    mapping = VocabMapping(*vocab_mapping(reference_vocab, 1000, seed=1))
    batches: list = [random_batch(reference_vocab, args.batch_size, args.seq_len, seed=i) for i in range(args.batches)]
    # Packed rows (several documents a row): the same planes, bit-exact with the in-process packed forward.
    third = args.seq_len // 3
    batches.append(
        packed_batch(reference_vocab, [[third, third, args.seq_len - 2 * third], [args.seq_len]], args.seq_len, 9)
    )
    env = {"CUDA_VISIBLE_DEVICES": "0"} if count >= 2 else {}
    server_args = ["--cache-dir", str(cache), "--device", "cuda", "--data-plane-timeout", "60"]
    with ServerProcess(server_args, env=env, log_path=cache / "server.log", startup_timeout=600) as server:
        offered = httpx.get(server.url + "/data_plane", trust_env=False).json()["offered"]
        check("server offers nccl with the model on CUDA", "nccl" in offered, str(offered))
        if count >= 2:
            two_gpus(server.url, mapping, batches)
        else:
            one_gpu(server.url, cache, mapping, batches)
        code = server.stop()
        check("server stops cleanly on SIGTERM", code == 0, f"exit code {code}; log {cache / 'server.log'}")
    print(f"== {'ALL PASSED' if not FAILED else 'FAILED: ' + ', '.join(FAILED)}")
    return 0 if not FAILED else 1


if __name__ == "__main__":
    raise SystemExit(main())
