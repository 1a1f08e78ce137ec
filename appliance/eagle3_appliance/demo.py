"""The appliance's main job, end to end on one machine, printed step by step.

Starts a real server process, drives it with the real training client exactly as the
EAGLE-3 recipe would (vocab mapping, embeddings, padded batches, prefetch), and checks each
answer bit for bit against the same model run in this process.
"""

from __future__ import annotations

import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from eagle3_appliance.core.inputs import GenerateInputs, VocabMapping
from eagle3_appliance.launch import ServerProcess
from eagle3_appliance.model.loading import load_target
from eagle3_appliance.model.numerics import measure, reference_and_tie_gaps, tolerance_for
from eagle3_appliance.model.supervision import compare_to_reference, in_process
from eagle3_appliance.model.target import Target
from eagle3_appliance.progress import Progress
from eagle3_appliance.settings import Settings
from eagle3_client import RemoteEagle3TargetModel
from eagle3_client.encodings import parse_encoding
from eagle3_client.protocol import ModelInfoExtension
from eagle3_client.synthetic import random_batch, vocab_mapping

__all__ = ["DriveSpec", "drive", "run_demo", "run_validate"]


def _mb(nbytes: int) -> str:
    return f"{nbytes / 1e6:.2f} MB"


def drive(
    urls: list[str],
    reference: Target,
    *,
    batches: int,
    batch_size: int,
    seq_len: int,
    draft_vocab: int,
    encoding: str | None = None,
) -> bool:
    """Drive servers with the real client as the recipe does; print each step; True if every check passed.

    ``encoding`` (default ``$EAGLE3_ENCODING``, else probs) is checked as it promises:
    bit-exact for probs and logits, within tolerance for hidden, top-K for topk:K. A server that
    says it runs tensor parallel (``/model_info``'s mode ``tp=N``) is checked within the
    documented tensor-parallel tolerance instead (:mod:`eagle3_appliance.model.numerics`).
    """
    all_exact = True
    with RemoteEagle3TargetModel.from_urls(urls, device="cpu", timeout=120, max_retries=3, encoding=encoding) as remote:
        info = remote.model_info()
        print(f"model   {info}")
        served = remote.served_model()
        note = _reference_mismatch(served, reference)
        if note:
            print(f"note    {note}")
        tolerance = None
        if served is not None and served.mode.startswith("tp="):
            tolerance = tolerance_for(reference.dtype)
            print(f"mode    {served.mode}: tensor parallel, checked within the documented tolerance {tolerance}")
        emb = remote.get_input_embeddings().weight
        emb_exact = torch.equal(emb, reference.input_embeddings.cpu())
        all_exact &= emb_exact
        print(
            f"embed   weight {list(emb.shape)} {emb.dtype} ({_mb(emb.numel() * emb.element_size())}) "
            f"bit-exact={'yes' if emb_exact else 'NO'}"
        )
        vocab = reference.logits_size
        mapping = VocabMapping(*vocab_mapping(vocab, min(draft_vocab, vocab)))
        remote.set_vocab_mapping(mapping.selected_token_ids, mapping.selected_token_mask)
        print(f"vocab   draft vocabulary of {mapping.draft_vocab_size} of {vocab} tokens sent to {len(urls)} server(s)")
        progress = Progress("/generate", batches, unit="batches", stream=sys.stderr)
        for i in range(batches):
            batch_inputs = random_batch(reference.vocab_size, batch_size, seq_len, seed=i)
            before = remote.encoding_stats()["batches"]
            start = time.perf_counter()
            result = remote.generate_batch(*batch_inputs)
            elapsed = time.perf_counter() - start
            if tolerance is not None:
                expected, gaps = reference_and_tie_gaps(reference, GenerateInputs(*batch_inputs), mapping)
            else:
                expected = in_process(reference, GenerateInputs(*batch_inputs), mapping)
            after = remote.encoding_stats()["batches"]
            used = next(name for name, count in after.items() if count != before.get(name, 0))
            if tolerance is not None:
                deviation = measure(result, expected, gaps, tolerance.tie_gap)
                exact, verdict = deviation.within(tolerance), deviation.verdict(tolerance)
            else:
                exact, verdict = compare_to_reference(result, expected, parse_encoding(used))
            all_exact &= exact
            nbytes = sum(t.numel() * t.element_size() for t in expected.values())
            progress.write(
                f"batch {i}  input {list(batch_inputs[0].shape)}  aux {list(result.aux_hidden_states.shape)} "
                f"{result.aux_hidden_states.dtype}  probs {list(result.target_probs.shape)}  "
                f"{_mb(nbytes)}  {elapsed * 1e3:.0f} ms  {batch_inputs[0].numel() / elapsed:.0f} tok/s  "
                f"supervised {int(result.position_mask.sum())}  " + (f"{used}: " if used != "probs" else "") + verdict
            )
            progress.update()
        progress.close()
        for entry in remote.transport_stats():
            moved = ", ".join(f"{tier} {_mb(n)}" for tier, n in entry["bytes"].items() if n)
            print(f"transport {entry['url']}: data plane {entry['tier']} ({moved}), fallbacks {entry['fallbacks']}")
    return all_exact


def _reference_mismatch(served: ModelInfoExtension | None, reference: Target) -> str | None:
    """Why the reference cannot be bit-exact with the (first) server, or None when dtype and device match.

    The same weights give other bits in another dtype, and kernels differ between devices, so
    a FAIL then says nothing about the server; an upstream server does not tell its own.
    """
    dtype, device = str(reference.dtype).removeprefix("torch."), reference.device.type
    if served is None:
        return (
            f"an upstream server does not say its dtype and device; this reference runs {dtype} on {device}, "
            "and answers are bit-exact only against the server's own"
        )
    served_device = served.device.split(":")[0]
    if (served.dtype, served_device) == (dtype, device):
        return None
    return (
        f"the server runs {served.dtype} on {served.device}, this reference {dtype} on {device}: answers are "
        f"bit-exact only against the server's own dtype and device; run validate with --dtype {served.dtype} "
        f"--device {served_device}"
    )


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


@dataclass(frozen=True)
class DriveSpec:
    """What the demo and ``validate`` drive: the reference model (as the server loads it) and the batches."""

    model: Settings
    batches: int
    batch_size: int
    seq_len: int
    draft_vocab: int
    encoding: str | None = None

    def reference(self) -> Target:
        return load_target(self.model)

    def drive(self, urls: list[str], reference: Target) -> bool:
        return drive(
            urls,
            reference,
            batches=self.batches,
            batch_size=self.batch_size,
            seq_len=self.seq_len,
            draft_vocab=self.draft_vocab,
            encoding=self.encoding,
        )


def run_demo(spec: DriveSpec, port: int = 0) -> int:
    """Start a server, drive it, stop it. Returns the exit code: 0 when every answer was bit-exact."""
    _quiet_transformers()
    model = spec.model
    print(f"== eagle3-appliance demo: model={model.model} dtype={model.dtype.value} device={model.device.value}")
    t0 = time.perf_counter()
    args = ["--model", model.model, "--dtype", model.dtype.value, "--device", model.device.value]
    args += ["--cache-dir", str(model.cache_dir)]
    log = Path(tempfile.gettempdir()) / "eagle3-appliance-demo-server.log"
    with ServerProcess(args, port=port, log_path=log) as server:
        print(f"server  {server.url} healthy after {time.perf_counter() - t0:.1f} s (log: {log})")
        ok = spec.drive([server.url], spec.reference())
        code = server.stop()
        print(f"server  stopped with SIGTERM, exit code {code}")
    print(f"done    {spec.batches} batches, bit-exact={'yes' if ok else 'NO'}, total {time.perf_counter() - t0:.1f} s")
    return 0 if ok and code == 0 else 1


def run_validate(spec: DriveSpec, urls: list[str]) -> int:
    """Check running servers against this process's own copy of the model. Exit code 0 = bit-exact."""
    _quiet_transformers()
    print(f"== eagle3-appliance validate: {len(urls)} server(s), reference model={spec.model.model}")
    ok = spec.drive(urls, spec.reference())
    print(f"result  {'PASS' if ok else 'FAIL'}: {spec.batches} batches, {len(urls)} server(s), bit-exact={ok}")
    return 0 if ok else 1
