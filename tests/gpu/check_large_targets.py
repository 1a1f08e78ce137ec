"""GPU check of the large-target modes, end to end: real appliance processes and the real client.

Run on a GPU machine (not collected by pytest; about 3-6 minutes on one GPU)::

    python tests/gpu/check_large_targets.py [--batches 3] [--seq-len 256]

The model is a bfloat16 Llama made from a seed (hidden 1024, 8 layers, vocabulary 32000), so
nothing is downloaded. Checks, one line each:

* ``--device-map`` spreading the layers (two GPUs: half on each; one GPU: half on the GPU,
  half offloaded to the host and run on the GPU) serves answers bit-identical to the whole
  model on one GPU, and ``/model_info`` says ``device_map``;
* ``--tensor-parallel-size 2`` (two GPUs, NCCL): answers within the documented bfloat16
  tolerance, ``/model_info`` says ``tp=2``; the measured deviation is printed (the GPU row of
  docs/large-targets.md). With one GPU: ``--tensor-parallel-size 1`` equals the single device
  bit for bit, and TP=2 is reported as not checkable;
* with nemo-automodel installed: ``--loader automodel`` (the recipe's own loader, its default
  kernels) serves answers bit-identical to the recipe's co-located target
  (``TrainEagle3Recipe._setup_colocated_target`` + its ``HFEagle3TargetModel``, projected as
  its trainer does) on the same inputs; likewise with ``--automodel-force-hf``.
* No GPU: says so and exits 0.

Exit code 0 when every check passed.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

# The same PASS/FAIL lines and bitwise comparison as the data-plane check (run from this folder).
from check_dataplanes import FAILED, check, same

from eagle3_appliance.core.inputs import GenerateInputs, VocabMapping
from eagle3_appliance.launch import ServerProcess
from eagle3_appliance.model import checkpoint
from eagle3_appliance.model.builtin_model import BUILTIN_CONFIG, ensure_builtin_model
from eagle3_appliance.model.loading import load_target
from eagle3_appliance.model.numerics import measure, reference_and_tie_gaps, tolerance_for
from eagle3_appliance.settings import Settings
from eagle3_client import RemoteEagle3TargetModel, protocol
from eagle3_client.synthetic import random_batch, vocab_mapping

CONFIG: dict[str, object] = {
    **BUILTIN_CONFIG,
    "hidden_size": 1024,
    "intermediate_size": 2816,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "vocab_size": 32000,
    "initializer_range": 0.02,
}


def serve_and_fetch(args: list[str], log: Path, mapping: VocabMapping, batches: list) -> tuple[str, list]:
    """Start a server with ``args``, fetch every batch with our client (wire, CUDA trainer); (mode, answers)."""
    start = time.monotonic()
    with ServerProcess(args, log_path=log, startup_timeout=600) as server:
        with RemoteEagle3TargetModel.from_urls([server.url], device="cuda", data_plane="wire", timeout=600) as remote:
            served = remote.served_model()
            remote.set_vocab_mapping(mapping.selected_token_ids, mapping.selected_token_mask)
            answers = [{k: getattr(remote.generate_batch(*b), k) for k in protocol.SUPERVISION_KEYS} for b in batches]
        code = server.stop()
    print(f"       ({' '.join(args[-4:])}: {time.monotonic() - start:.0f} s, exit {code}, log {log})", flush=True)
    return (served.mode if served is not None else "?"), answers


def spread_map(num_layers: int, gpus: int) -> str:
    second = "1" if gpus >= 2 else "cpu"  # one GPU: the second half offloaded to the host, run on the GPU
    entries: dict[str, int | str] = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.norm": second}
    entries["lm_head"] = second
    entries.update({f"model.layers.{i}": 0 if i < num_layers // 2 else second for i in range(num_layers)})
    return json.dumps(entries)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=256)
    args = parser.parse_args()
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    print(f"== large-target GPU check: {gpus} GPU(s) visible, torch {torch.__version__}")
    if gpus == 0:
        print("no GPU visible: nothing to check here (the CPU tests cover TP over gloo and device maps)")
        return 0
    work = Path(tempfile.mkdtemp(prefix="eagle3-large-check-"))
    model = ensure_builtin_model(work, CONFIG)
    common = ["--model", str(model), "--dtype", "bfloat16", "--cache-dir", str(work), "--device", "cuda"]
    mapping = VocabMapping(*vocab_mapping(32000, 8192, seed=1))
    batches = [random_batch(32000, args.batch_size, args.seq_len, seed=i) for i in range(args.batches)]
    reference = load_target(Settings(model=str(model), dtype="bfloat16", device="cuda", cache_dir=work))
    references = [reference_and_tie_gaps(reference, GenerateInputs(*b), mapping) for b in batches]
    want = [expected for expected, _ in references]

    _, single = serve_and_fetch(common, work / "single.log", mapping, batches)
    check("single device serves the in-process answers bit for bit", all(map(same, single, want)))

    layers = int(CONFIG["num_hidden_layers"])  # type: ignore[call-overload]
    mode, spread = serve_and_fetch(
        [*common, "--device-map", spread_map(layers, gpus)], work / "map.log", mapping, batches
    )
    where = "cuda:0 + cuda:1" if gpus >= 2 else "cuda:0 + host offload"
    check(
        f"--device-map over {where} == single device, bit for bit",
        mode == "device_map" and all(map(same, spread, want)),
    )
    mode, auto = serve_and_fetch([*common, "--device-map", "auto"], work / "auto.log", mapping, batches)
    check("--device-map auto == single device, bit for bit", mode == "device_map" and all(map(same, auto, want)))

    if gpus >= 2:
        mode, tp = serve_and_fetch([*common, "--tensor-parallel-size", "2"], work / "tp.log", mapping, batches)
        tolerance = tolerance_for(torch.bfloat16)
        verdicts = []
        for got, (expected, gaps) in zip(tp, references, strict=True):

            class Batch:
                pass

            batch = Batch()
            batch.__dict__.update(got)
            verdicts.append(measure(batch, expected, gaps, tolerance.tie_gap))
        ok = mode == "tp=2" and all(v.within(tolerance) for v in verdicts)
        check("--tensor-parallel-size 2 (NCCL) within the bfloat16 tolerance", ok, verdicts[0].verdict(tolerance))
    else:
        mode, tp1 = serve_and_fetch([*common, "--tensor-parallel-size", "1"], work / "tp1.log", mapping, batches)
        check("--tensor-parallel-size 1 == single device, bit for bit", mode == "single" and all(map(same, tp1, want)))
        print("(--tensor-parallel-size 2 needs two GPUs: not checked here)")

    refusal = checkpoint.automodel_refusal(torch.device("cuda"))
    if refusal is not None:
        print(f"(--loader automodel not checked: {refusal})")
    else:
        automodel_check(common, work, mapping, batches)
    print(f"== {'ALL PASSED' if not FAILED else 'FAILED: ' + ', '.join(FAILED)}")
    return 0 if not FAILED else 1


def automodel_check(common: list[str], work: Path, mapping: VocabMapping, batches: list) -> None:
    """``--loader automodel`` against the recipe's co-located target, loaded by the recipe in this process."""
    from nemo_automodel.components.speculative.eagle.core import _compute_target_distribution

    model = common[common.index("--model") + 1]
    for force_hf in (False, True):
        extra = ["--loader", "automodel"] + (["--automodel-force-hf"] if force_hf else [])
        mode, got = serve_and_fetch([*common, *extra], work / f"automodel-{force_hf}.log", mapping, batches)
        settings = Settings(model=model, loader="automodel", automodel_force_hf=force_hf, cache_dir=work)
        recipe = checkpoint.recipe_colocated_target(settings, model, torch.device("cuda", 0), torch.bfloat16)
        exact = True
        for b, answer in zip(batches, got, strict=True):
            inputs = [t.cuda() for t in b]
            batch = recipe.target_wrapper.generate_batch(*inputs)
            probs, position_mask = _compute_target_distribution(
                target_logits=batch.logits,
                selected_token_ids=mapping.selected_token_ids.cuda(),
                selected_token_mask=mapping.selected_token_mask.cuda(),
                loss_mask=batch.loss_mask,
            )
            colocated = {
                "aux_hidden_states": batch.aux_hidden_states,
                "target_probs": probs,
                "position_mask": position_mask,
                "input_ids": batch.input_ids,
                "loss_mask": batch.loss_mask,
            }
            exact &= same(answer, colocated)
        del recipe
        torch.cuda.empty_cache()
        check(f"--loader automodel (force_hf={force_hf}) == the recipe's co-located target, bit for bit", exact)


if __name__ == "__main__":
    raise SystemExit(main())
