"""GPU check of the sliced LM head and of one GPU for both ends (not collected by pytest; 1-3 min).

Run on a GPU machine::

    python tests/gpu/check_long_samples.py [--seq-len 4096]

Why: on the CPU the sliced head is bit-identical to the whole one (``tests/test_head_slices.py``),
but a GPU library may pick another kernel for another row count; the server therefore slices
on an accelerator only what the unsliced path cannot hold. This script measures what that
costs in bits, on a bfloat16 Llama made from a seed (vocabulary 32000, nothing downloaded),
one line each:

* the model's logits against the head over slices of 16, 37, 523 and 1398 rows: equal, or the
  largest difference (the number ``docs/operations.md`` "Long samples" quotes for GPUs);
* the served supervision (``probs``) of a sliced forward against the unsliced reference, and
  whether the argmax (``position_mask``) moved anywhere;
* the GPU's identity as the two ends name it: CUDA's UUID (``cuda_uuid``) equals NVML's;
* one GPU for both ends: a server on ``cuda:0`` and a trainer on ``cuda:0`` with
  ``data_plane="auto"`` get the wire (with the reason), and a forced ``nccl`` is refused with
  ``DataPlaneUnavailable`` instead of hanging.

No GPU: says so and exits 0. Exit code 0 when every check passed (a measured difference of
the sliced head is reported, not failed: it is what the documentation states).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

# The same PASS/FAIL lines and bitwise comparison as the data-plane check (run from this folder).
from check_dataplanes import FAILED, check, same

from eagle3_appliance.core.inputs import GenerateInputs, VocabMapping
from eagle3_appliance.launch import ServerProcess
from eagle3_appliance.model.builtin_model import BUILTIN_CONFIG, ensure_builtin_model
from eagle3_appliance.model.loading import load_target
from eagle3_appliance.model.supervision import encode, reference_projection
from eagle3_appliance.settings import Settings
from eagle3_client import DataPlaneUnavailable, RemoteEagle3TargetModel
from eagle3_client.encodings import PROBS
from eagle3_client.synthetic import random_batch, vocab_mapping
from eagle3_client.transports.gpu_identity import cuda_uuid

CONFIG: dict[str, object] = {**BUILTIN_CONFIG, "hidden_size": 1024, "intermediate_size": 2816, "vocab_size": 32000}
SLICE_ROWS = (16, 37, 523, 1398)


def head_slices(model: Path, work: Path, seq_len: int) -> None:
    target = load_target(Settings(model=str(model), dtype="bfloat16", device="cuda", cache_dir=work))
    ids, mask, loss = (t.cuda() for t in random_batch(32000, 1, seq_len, seed=7))
    inputs = GenerateInputs(ids, mask, loss)
    mapping = VocabMapping(*(t.cuda() for t in vocab_mapping(32000, 8192, seed=1)))
    with torch.no_grad():
        whole = target.forward(ids, mask)
        assert whole.logits is not None
        want = reference_projection(whole.aux_hidden_states, whole.logits, ids, loss, mapping)
        for rows in SLICE_ROWS:
            sliced = target.forward(ids, mask, slice_rows=rows)
            logits = sliced.full_logits()
            diff = (logits.float() - whole.logits.float()).abs().max().item()
            print(f"       slices of {rows:>4} rows: logits max |diff| {diff:.3g}", flush=True)
            got = encode(PROBS, target.forward(ids, mask, slice_rows=rows), inputs, mapping)
            moved = int((got["position_mask"] != want["position_mask"]).sum())
            probs = (got["target_probs"] - want["target_probs"]).abs().max().item()
            check(
                f"sliced head ({rows} rows) serves the unsliced supervision",
                same(got, want),
                f"logits max |diff| {diff:.3g}, target_probs max |diff| {probs:.3g}, position_mask moved at {moved}",
            )
    print(f"       slicing_refusal: {target.slicing_refusal()!r}", flush=True)


def identity() -> None:
    from_cuda = cuda_uuid(torch.device("cuda:0"))
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        raw = pynvml.nvmlDeviceGetUUID(handle)
        from_nvml = raw.decode() if isinstance(raw, bytes) else str(raw)
        pynvml.nvmlShutdown()
    except Exception as exc:  # noqa: BLE001 - report, do not fail: NVML may be absent in a container
        print(f"       NVML unavailable ({exc}); CUDA names cuda:0 {from_cuda}", flush=True)
        return
    check("CUDA's UUID of cuda:0 equals NVML's", from_cuda == from_nvml, f"cuda {from_cuda}, nvml {from_nvml}")


def one_gpu_for_both_ends(model: Path, work: Path) -> None:
    args = ["--model", str(model), "--dtype", "bfloat16", "--cache-dir", str(work), "--device", "cuda"]
    batch = random_batch(32000, 1, 128, seed=3)
    ids, mask = vocab_mapping(32000, 8192, seed=1)
    with ServerProcess(args, log_path=work / "same-gpu.log", startup_timeout=600) as server:
        with RemoteEagle3TargetModel.from_urls([server.url], device="cuda:0", data_plane="auto", timeout=300) as remote:
            remote.set_vocab_mapping(ids, mask)
            remote.generate_batch(*batch)
            stats = remote.transport_stats()[0]
            tier, reason = stats.get("tier"), str(stats.get("tier_reason"))
        check("auto on the server's own GPU takes the wire, with the reason", tier == "wire", f"{tier}: {reason}")
        refused = ""
        try:
            with RemoteEagle3TargetModel.from_urls([server.url], device="cuda:0", data_plane="nccl", timeout=60) as r:
                r.set_vocab_mapping(ids, mask)
                r.generate_batch(*batch)
        except DataPlaneUnavailable as exc:
            refused = str(exc)
        check("a forced nccl on the server's own GPU is refused by name", "same GPU" in refused, refused[:200])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq-len", type=int, default=4096)
    args = parser.parse_args()
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    print(f"== long-sample GPU check: {gpus} GPU(s) visible, torch {torch.__version__}")
    if gpus == 0:
        print("no GPU visible: nothing to check here (tests/test_head_slices.py covers the CPU)")
        return 0
    work = Path(tempfile.mkdtemp(prefix="eagle3-long-check-"))
    model = ensure_builtin_model(work, CONFIG)
    head_slices(model, work, args.seq_len)
    identity()
    one_gpu_for_both_ends(model, work)
    print(f"== {'all passed' if not FAILED else f'{len(FAILED)} FAILED: {FAILED}'}")
    return 0 if not FAILED else 1


if __name__ == "__main__":
    raise SystemExit(main())
