"""Targets larger than one device: tensor-parallel serving, device maps, attention kernels, the failure path.

Every server here is a real appliance process on 127.0.0.1. The tensor-parallel one runs two
ranks on the CPU (gloo) over a Llama generated from a seed (hidden 128, 8 layers, vocabulary
8192); its answers are checked against the same model run whole in this process, within the
documented tolerance (:mod:`eagle3_appliance.model.numerics`).
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
import torch
from safetensors import safe_open

from benchmarks.numerics.run import TP_TEST_CONFIG
from eagle3_appliance.core.inputs import GenerateInputs, Packing, VocabMapping
from eagle3_appliance.launch import ServerProcess
from eagle3_appliance.model.builtin_model import ensure_builtin_model
from eagle3_appliance.model.loading import load_target
from eagle3_appliance.model.numerics import measure, reference_and_tie_gaps, tolerance_for
from eagle3_appliance.model.supervision import in_process
from eagle3_appliance.model.target import Target
from eagle3_appliance.model.tensor_parallel import EXIT_DELAY, EXIT_RANK_FAILED
from eagle3_appliance.settings import Settings
from eagle3_client import RemoteDFlashTargetModel, RemoteEagle3TargetModel, protocol, wire
from eagle3_client.synthetic import packed_batch, random_batch, vocab_mapping
from tests.oracle import assert_bit_exact

VOCAB = 8192
# Seconds from a rank's failure to the exit, with room for a busy machine (the bound is
# the failure detection plus EXIT_DELAY, docs/large-targets.md).
EXIT_BOUND = EXIT_DELAY + 30.0
TOLERANCE = tolerance_for(torch.float32)


@pytest.fixture(scope="module")
def tp_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_builtin_model(tmp_path_factory.mktemp("tp-model"), TP_TEST_CONFIG)


@pytest.fixture(scope="module")
def reference(tp_model: Path) -> Target:
    """The same checkpoint, whole on one device, in this process: what "in-process" means."""
    return load_target(Settings(model=str(tp_model), device="cpu"))


def _tp_args(model: Path, *extra: str) -> list[str]:
    return ["--model", str(model), "--device", "cpu", "--tensor-parallel-size", "2", *extra]


@pytest.fixture(scope="module")
def tp_server(tp_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("tp-logs") / "server.log"
    with ServerProcess(_tp_args(tp_model), log_path=log, startup_timeout=300) as server:
        yield server


def _ranks(server: ServerProcess) -> list[psutil.Process]:
    """The worker processes (ranks 1..N-1) of a tensor-parallel server."""
    assert server.proc is not None
    return [
        p
        for p in psutil.Process(server.proc.pid).children()
        if "eagle3_appliance.model.tensor_parallel" in " ".join(p.cmdline())
    ]


def _within(got: object, reference: Target, inputs: tuple[torch.Tensor, ...], mapping: VocabMapping) -> str:
    """Assert a served answer is within the documented tolerance of the in-process one; the verdict."""
    expected, gaps = reference_and_tie_gaps(reference, GenerateInputs(*inputs), mapping)
    deviation = measure(got, expected, gaps, TOLERANCE.tie_gap)
    assert deviation.within(TOLERANCE), deviation.verdict(TOLERANCE)
    return deviation.verdict(TOLERANCE)


def test_tensor_parallel_serves_our_client_within_the_documented_tolerance(
    tp_server: ServerProcess, reference: Target
) -> None:
    ids, mask = vocab_mapping(VOCAB, 1500, seed=3)
    mapping = VocabMapping(ids, mask)
    with RemoteEagle3TargetModel.from_urls([tp_server.url], device="cpu", timeout=120) as remote:
        served = remote.served_model()
        assert served is not None and served.mode == "tp=2"
        assert remote.model_info()["aux_layer_ids"] == reference.aux_layer_ids
        # The embedding is sharded over the ranks; the server gathered it once: bit-exact.
        assert torch.equal(remote.get_input_embeddings().weight, reference.input_embeddings)
        remote.set_vocab_mapping(ids, mask)
        for seed, (batch, seq) in enumerate([(2, 48), (1, 1), (3, 33)]):
            inputs = random_batch(VOCAB, batch, seq, seed=seed)
            _within(remote.generate_batch(*inputs), reference, inputs, mapping)
        # Packed rows: every rank gets the packing and builds the same block-causal mask.
        for seed, rows in enumerate([[[10, 20, 18]], [[5, 40], [30, 3, 12]]]):
            batch = packed_batch(VOCAB, rows, 48, seed=20 + seed)
            packing = Packing(batch["position_ids"], batch["seq_lens"], batch["doc_remaining"])
            inputs = (batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
            expected, gaps = reference_and_tie_gaps(reference, GenerateInputs(*inputs, packing), mapping)
            deviation = measure(remote.generate_batch(**batch), expected, gaps, TOLERANCE.tie_gap)
            assert deviation.within(TOLERANCE), deviation.verdict(TOLERANCE)
    metrics = httpx.get(tp_server.url + "/metrics", trust_env=False).text
    assert 'eagle3_target_info{attn_implementation="default",loader="transformers",mode="tp=2"} 1.0' in metrics
    assert len(_ranks(tp_server)) == 1


def test_tensor_parallel_serves_a_raw_upstream_style_client(tp_server: ServerProcess, reference: Target) -> None:
    """Upstream's wire protocol spoken with httpx and the wire codec: no session, no extension."""
    ids, mask = vocab_mapping(VOCAB, 700, seed=5)
    headers = {"Content-Type": "application/octet-stream"}
    with httpx.Client(base_url=tp_server.url, trust_env=False, timeout=120) as http:
        info = http.post("/model_info").json()
        assert protocol.MODEL_INFO_EXTENSION_KEY not in info
        assert info["vocab_size"] == VOCAB and info["aux_layer_ids"] == reference.aux_layer_ids
        weight = wire.decode(http.post("/input_embeddings").content)["weight"]
        assert torch.equal(weight, reference.input_embeddings)
        body = wire.encode({"selected_token_ids": ids, "selected_token_mask": mask})
        assert http.post("/set_vocab_mapping", content=body, headers=headers).status_code == 200
        inputs = random_batch(VOCAB, 2, 40, seed=9)
        resp = http.post("/generate", content=wire.encode(dict(zip(protocol.GENERATE_INPUT_KEYS, inputs, strict=True))))
        assert resp.status_code == 200, resp.text
        assert protocol.ENCODING_HEADER not in resp.headers
        answer = wire.decode(resp.content)

    class Batch:  # the decoded answer with attribute access, as the clients give it
        def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
            self.__dict__.update(tensors)

    _within(Batch(answer), reference, inputs, VocabMapping(ids, mask))


def test_each_rank_logs_its_load_progress(tp_server: ServerProcess, tp_model: Path) -> None:
    """Under tensor parallelism every rank loads its shards and says how far it got, prefixed with its rank."""
    assert tp_server.log_path is not None
    log = tp_server.log_path.read_text()
    with safe_open(str(tp_model / "model.safetensors"), "pt") as f:
        n = len(list(f.keys()))
    for rank in (0, 1):
        assert f"rank {rank}: loading weights: 0/" in log, log[-3000:]
        assert re.search(rf"rank {rank}: loading weights: (\d+)/\1 tensors \(100 %\), [0-9.]+ s elapsed, done", log)
    totals = {int(t) for t in re.findall(r"rank \d: loading weights: \d+/(\d+) tensors", log)}
    assert totals == {n}, (totals, n)


def test_hidden_encoding_is_refused_by_a_tensor_parallel_target(tp_server: ServerProcess) -> None:
    offer = protocol.SessionOffer(client="test", encoding="hidden", encodings=("probs",)).to_json()
    resp = httpx.post(tp_server.url + protocol.path(protocol.EP_SESSION), json=offer, trust_env=False)
    assert resp.status_code == 200, resp.text
    reply = resp.json()
    assert reply["encoding"] == "probs"
    assert "tensor-parallel" in json.dumps(reply["encoding_refused"])


def test_sigterm_stops_every_rank_and_exits_0(tp_model: Path, tmp_path: Path) -> None:
    server = ServerProcess(_tp_args(tp_model), log_path=tmp_path / "server.log", startup_timeout=300).start()
    workers = _ranks(server)
    assert len(workers) == 1
    assert server.stop() == 0
    workers[0].wait(timeout=30)  # gone with rank 0: raises if still running


def _wait_not_ready(url: str, deadline: float) -> list[str]:
    while time.monotonic() < deadline:
        try:
            resp = httpx.get(url + "/health/ready", timeout=2, trust_env=False)
        except httpx.TransportError:
            pytest.fail("the server stopped answering before /health/ready reported the failed rank")
        if resp.status_code == 503:
            reasons: list[str] = resp.json()["reasons"]
            return reasons
        time.sleep(0.05)
    pytest.fail("/health/ready never reported the failed rank")


def _assert_exits_failed(server: ServerProcess, since: float) -> None:
    assert server.proc is not None
    try:
        code = server.proc.wait(timeout=max(1.0, since + EXIT_BOUND - time.monotonic()))
    except subprocess.TimeoutExpired:
        pytest.fail(f"the server did not exit within {EXIT_BOUND:g} s of the rank's failure")
    assert code == EXIT_RANK_FAILED


def test_killing_rank_1_mid_run_makes_the_server_not_ready_and_exit_nonzero(tp_model: Path, tmp_path: Path) -> None:
    server = ServerProcess(_tp_args(tp_model), log_path=tmp_path / "server.log", startup_timeout=300).start()
    try:
        ids, mask = vocab_mapping(VOCAB, 512, seed=1)
        statuses: list[int | str] = []
        stop = threading.Event()

        def traffic() -> None:  # upstream-style requests, one after the other, until told to stop
            with httpx.Client(base_url=server.url, trust_env=False, timeout=60) as http:
                body = wire.encode({"selected_token_ids": ids, "selected_token_mask": mask})
                http.post("/set_vocab_mapping", content=body)
                inputs = wire.encode(
                    dict(zip(protocol.GENERATE_INPUT_KEYS, random_batch(VOCAB, 2, 64, seed=2), strict=True))
                )
                for _ in range(200):
                    if stop.is_set():
                        return
                    try:
                        statuses.append(http.post("/generate", content=inputs).status_code)
                    except httpx.TransportError as exc:
                        statuses.append(type(exc).__name__)
                        return

        thread = threading.Thread(target=traffic)
        thread.start()
        deadline = time.monotonic() + 60
        while 200 not in statuses and time.monotonic() < deadline:
            time.sleep(0.05)
        assert 200 in statuses, statuses
        (worker,) = _ranks(server)
        worker.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        reasons = _wait_not_ready(server.url, killed + EXIT_BOUND)
        assert any("rank 1" in r and "exited" in r for r in reasons), reasons
        _assert_exits_failed(server, killed)
        stop.set()
        thread.join(timeout=60)
        assert not thread.is_alive()
        # Requests after the failure were refused (503) or cut off when the process exited.
        after = statuses[statuses.index(200) :]
        assert all(s in (200, 503) or isinstance(s, str) for s in after), after
    finally:
        server.stop()


def test_a_hung_rank_makes_the_server_not_ready_and_exit_nonzero(tp_model: Path, tmp_path: Path) -> None:
    server = ServerProcess(
        _tp_args(tp_model, "--tensor-parallel-timeout", "2"), log_path=tmp_path / "server.log", startup_timeout=300
    ).start()
    (worker,) = _ranks(server)
    try:
        worker.send_signal(signal.SIGSTOP)  # alive, but silent: a hang
        stopped = time.monotonic()
        reasons = _wait_not_ready(server.url, stopped + EXIT_BOUND)
        assert any("rank 1" in r and "heartbeat" in r for r in reasons), reasons
        _assert_exits_failed(server, stopped)
        worker.wait(timeout=30)  # the server killed it before exiting
    finally:
        if worker.is_running():
            worker.kill()
        server.stop()


# -- device maps: the same kernels per layer, so bit-exact on one device type ----------------------


def _layer_map(num_layers: int, devices: tuple[str, str]) -> str:
    """An explicit device map naming every module of a Llama: the first half on one device, the rest on the other."""
    first, second = devices
    entries = {"model.embed_tokens": first, "model.rotary_emb": first, "model.norm": second, "lm_head": second}
    entries.update({f"model.layers.{i}": first if i < num_layers // 2 else second for i in range(num_layers)})
    return json.dumps(entries)


@pytest.mark.parametrize("device_map", ["cpu+disk", "auto"])
def test_a_device_map_on_the_cpu_is_bit_exact(model_dir: Path, tmp_path: Path, device_map: str) -> None:
    """``cpu+disk``: accelerate's hooks run every layer (half of them read back from disk) on the CPU."""
    plain = load_target(Settings(model=str(model_dir), device="cpu"))
    spec = _layer_map(plain.num_hidden_layers, ("cpu", "disk")) if device_map == "cpu+disk" else "auto"
    mapped = load_target(Settings(model=str(model_dir), device="cpu", device_map=spec, cache_dir=tmp_path))
    assert (mapped.mode, plain.mode) == ("device_map", "single")
    if device_map == "cpu+disk":
        assert set(mapped.model.hf_device_map.values()) == {"cpu", "disk"}
    mapping = VocabMapping(*vocab_mapping(1024, 300, seed=2))
    for seed, (batch, seq) in enumerate([(2, 30), (1, 1), (3, 17)]):
        inputs = GenerateInputs(*random_batch(1024, batch, seq, seed=seed))
        assert_bit_exact(in_process(mapped, inputs, mapping), in_process(plain, inputs, mapping))


def test_a_served_device_map_is_bit_exact_and_says_so(model_dir: Path, cache_dir: Path, tmp_path: Path) -> None:
    plain = load_target(Settings(model=str(model_dir), device="cpu"))
    args = ["--model", str(model_dir), "--device", "cpu", "--device-map", _layer_map(8, ("cpu", "disk"))]
    args += ["--cache-dir", str(tmp_path)]
    ids, mask = vocab_mapping(1024, 400, seed=4)
    with ServerProcess(args, log_path=tmp_path / "server.log") as server:
        with RemoteEagle3TargetModel.from_urls([server.url], device="cpu", timeout=60) as remote:
            served = remote.served_model()
            assert served is not None and served.mode == "device_map"
            remote.set_vocab_mapping(ids, mask)
            inputs = random_batch(1024, 2, 25, seed=6)
            got = remote.generate_batch(*inputs)
            packed = packed_batch(1024, [[7, 11, 7], [25]], 25, seed=7)
            got_packed = remote.generate_batch(**packed)
    expected = in_process(plain, GenerateInputs(*inputs), VocabMapping(ids, mask))
    assert_bit_exact({k: getattr(got, k) for k in expected}, expected)
    packing = Packing(packed["position_ids"], packed["seq_lens"], packed["doc_remaining"])
    plain_inputs = GenerateInputs(packed["input_ids"], packed["attention_mask"], packed["loss_mask"], packing)
    expected = in_process(plain, plain_inputs, VocabMapping(ids, mask))
    assert_bit_exact({k: getattr(got_packed, k) for k in expected}, expected)
    log = (tmp_path / "server.log").read_text()
    assert "placement device_map: layers 0-3 on cpu" in log


# -- the attention kernels the recipe names (target_attn_implementation) ---------------------------


def test_attn_implementation_reaches_the_model_and_serves_bit_exact(model_dir: Path, tmp_path: Path) -> None:
    eager = load_target(Settings(model=str(model_dir), device="cpu", attn_implementation="eager"))
    assert eager.model.config._attn_implementation == "eager"
    assert load_target(Settings(model=str(model_dir), device="cpu")).model.config._attn_implementation == "sdpa"
    args = ["--model", str(model_dir), "--device", "cpu", "--attn-implementation", "eager"]
    ids, mask = vocab_mapping(1024, 256, seed=7)
    with ServerProcess(args, log_path=tmp_path / "server.log") as server:
        with RemoteEagle3TargetModel.from_urls([server.url], device="cpu", timeout=60) as remote:
            remote.set_vocab_mapping(ids, mask)
            inputs = random_batch(1024, 2, 21, seed=8)
            got = remote.generate_batch(*inputs)
        metrics = httpx.get(server.url + "/metrics", trust_env=False).text
    expected = in_process(eager, GenerateInputs(*inputs), VocabMapping(ids, mask))
    assert_bit_exact({k: getattr(got, k) for k in expected}, expected)
    assert 'attn_implementation="eager",loader="transformers",mode="single"' in metrics


def _serve_fails(args: list[str], cache_dir: Path) -> tuple[int, str]:
    proc = subprocess.run(
        [sys.executable, "-m", "eagle3_appliance", "serve", "--cache-dir", str(cache_dir), "--port", "0", *args],
        capture_output=True,
        text=True,
        timeout=180,
    )
    # typer draws the message in a box: its borders and line breaks are not part of the text.
    return proc.returncode, " ".join((proc.stdout + proc.stderr).replace("│", " ").split())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--attn-implementation", "flash_attention_2", "--device", "cpu"], "FlashAttention2"),
        (["--attn-implementation", "no-such-kernel", "--device", "cpu"], "no-such-kernel"),
        (["--tensor-parallel-size", "2", "--device-map", "auto"], "choose one"),
        (["--max-memory", "0=10GiB"], "needs --device-map"),
        (["--device-map", "{not json"], "JSON"),
        (["--loader", "automodel", "--device-map", "auto"], "--loader automodel"),
        (["--automodel-force-hf"], "--loader automodel only"),
    ],
)
def test_placement_and_loader_options_are_refused_with_a_clear_message(
    cache_dir: Path, args: list[str], message: str
) -> None:
    code, output = _serve_fails(args, cache_dir)
    assert code == 2, output[-2000:]
    assert message in output, output[-2000:]


def test_the_automodel_loader_is_refused_where_it_cannot_run(cache_dir: Path) -> None:
    """On a machine without CUDA (or without nemo-automodel) the option says why and exits 2."""
    code, output = _serve_fails(["--loader", "automodel", "--device", "cpu"], cache_dir)
    assert code == 2, output[-2000:]
    try:
        import nemo_automodel  # noqa: F401
    except Exception:  # noqa: BLE001 - not installed or not importable here
        assert "--loader automodel needs NeMo AutoModel" in output, output[-2000:]
    else:
        assert "--loader automodel needs CUDA" in output, output[-2000:]


# -- Slurm: servers per node = GPUs per node / TENSOR_PARALLEL_SIZE ------------------------------

COMMON_SH = Path(__file__).resolve().parents[1] / "slurm" / "common.sh"


def _bash(script: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-c", f"source {COMMON_SH}; {script}"],
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": "/usr/bin:/bin", **env},
    )


@pytest.mark.parametrize(("local_id", "per", "want"), [(0, 1, "2"), (1, 1, "3"), (0, 2, "2,3"), (1, 2, "4,5")])
def test_slurm_server_task_gives_each_server_its_own_gpus(local_id: int, per: int, want: str) -> None:
    env = {
        "SLURM_LOCALID": str(local_id),
        "SLURM_PROCID": str(local_id),
        "SLURMD_NODENAME": "n0",
        "CUDA_VISIBLE_DEVICES": "2,3,4,5",
    }
    out = _bash(f"server_task 8001 {per} bash -c 'echo \"$CUDA_VISIBLE_DEVICES $*\"' task", **env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1] == f"{want} --port {8001 + local_id}"


def test_slurm_servers_per_node_divides_the_gpus() -> None:
    assert _bash("servers_per_node 8 2").stdout.strip() == "4"
    assert _bash("servers_per_node 8 1").stdout.strip() == "8"
    bad = _bash("servers_per_node 8 3")
    assert bad.returncode == 2 and "TENSOR_PARALLEL_SIZE=3" in bad.stderr


def test_tensor_parallel_serves_dflash_within_the_documented_tolerance(
    tp_server: ServerProcess, reference: Target
) -> None:
    """DFlash captures on ``tp=2``: layers and logits within ``aux_rel`` of their largest magnitude; the
    embeddings and LM head (gathered once at load) bit-exact."""
    layers = [0, 2, reference.num_hidden_layers - 1]
    with RemoteDFlashTargetModel.from_urls([tp_server.url], target_layer_ids=layers, capture_logits=True) as remote:
        for seed, (batch, seq) in enumerate([(2, 40), (1, 1)]):
            inputs = random_batch(VOCAB, batch, seq, seed=30 + seed, pad=batch > 1)
            got = remote.generate_batch(*inputs)
            want, logits = _reference_layers(reference, inputs, layers)
            for name, served, expected in (("hidden_states", got.hidden_states, want), ("logits", got.logits, logits)):
                assert served.dtype == expected.dtype and served.shape == expected.shape, name
                deviation = float((served - expected).abs().max()) / float(expected.abs().max())
                assert deviation <= TOLERANCE.aux_rel, f"{name}: {deviation:.2g} of max"
        assert torch.equal(remote.get_output_embeddings().weight, reference.lm_head_weight())
        assert torch.equal(remote.get_input_embeddings().weight, reference.input_embeddings)


def _reference_layers(
    reference: Target, inputs: tuple[torch.Tensor, ...], layers: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The layers' outputs (hooked here) and the logits of the whole model in this process."""
    outputs: dict[int, torch.Tensor] = {}
    handles = [
        reference.layers[i].register_forward_hook(
            lambda _m, _a, out, i=i: outputs.__setitem__(i, out[0] if isinstance(out, tuple) else out)
        )
        for i in layers
    ]
    try:
        with torch.no_grad():
            logits = reference.model(input_ids=inputs[0], attention_mask=inputs[1]).logits
    finally:
        for handle in handles:
            handle.remove()
    return torch.cat([outputs[i] for i in layers], dim=-1), logits
