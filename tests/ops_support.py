"""Helpers for the operations tests: fake NVML state, a deliberately slow model, scraping, waiting.

Imported by ``tests/test_ops_*.py`` (as ``tests.ops_support``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, TypeVar

import httpx
import torch
from prometheus_client.parser import text_string_to_metric_families

from eagle3_appliance.launch import ServerProcess
from eagle3_client import wire
from eagle3_client.synthetic import padded_batch, vocab_mapping

if TYPE_CHECKING:
    import pytest

T = TypeVar("T")

REPO = Path(__file__).resolve().parent.parent
FAKE_NVML_DIR = Path(__file__).resolve().parent / "fake_nvml"

# The slow model sleeps in forward only when a batch starts with this token, so one server
# answers both slow and fast requests.
SLOW_TOKEN = 7

# A test switch for one server of a fleet: every forward sleeps this long (the weights, and
# so the model fingerprint, stay those of its peers).
FORWARD_DELAY_ENV = "EAGLE3_TEST_FORWARD_DELAY"

_SLOW_MODELING = f'''
"""A Llama whose forward sleeps first when the batch starts with a marker token (tests only).

With ${FORWARD_DELAY_ENV} set, every forward of a batch sleeps that many seconds.
"""
import os
import time

from transformers import LlamaForCausalLM


class SlowLlamaForCausalLM(LlamaForCausalLM):
    def forward(self, input_ids=None, **kwargs):
        if input_ids is not None and int(input_ids[0, 0]) == self.config.slow_token_id:
            time.sleep(self.config.slow_forward_seconds)
        elif input_ids is not None and input_ids.shape[0] > 1 and os.environ.get("{FORWARD_DELAY_ENV}"):
            time.sleep(float(os.environ["{FORWARD_DELAY_ENV}"]))
        return super().forward(input_ids=input_ids, **kwargs)
'''


def healthy_gpus() -> list[dict[str, Any]]:
    """Two healthy fake H100s with distinct readings."""
    return [
        {
            "name": "NVIDIA H100 80GB HBM3",
            "uuid": "GPU-11111111-2222-3333-4444-555555555555",
            "memory_used": 10 * 1024**3,
            "memory_total": 80 * 1024**3,
            "util_gpu": 37,
            "util_memory": 12,
            "temperature": 41,
            "power_mw": 123_456,
            "power_limit_mw": 700_000,
            "clocks_event_reasons": 0,
            "ecc_uncorrected_volatile": 0,
            "remapped_rows": [0, 0, 0, 0],
        },
        {
            "name": "NVIDIA H100 PCIe",
            "uuid": "GPU-66666666-7777-8888-9999-000000000000",
            "memory_used": 1 * 1024**3,
            "memory_total": 80 * 1024**3,
            "util_gpu": 0,
            "util_memory": 0,
            "temperature": 33,
            "power_mw": 60_000,
            "power_limit_mw": 350_000,
            "clocks_event_reasons": 0x1,
            "ecc_uncorrected_volatile": 0,
            "remapped_rows": [0, 0, 0, 0],
        },
    ]


def write_state(path: Path, state: dict[str, Any]) -> None:
    """Atomically replace the fake NVML state file a server reads."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state))
    os.replace(tmp, path)


def install_fake_nvml(monkeypatch: pytest.MonkeyPatch, config: dict[str, Any]) -> ModuleType:
    """A fresh fake ``pynvml`` configured with ``config``, installed as ``sys.modules["pynvml"]``
    for one test (no ``CUDA_VISIBLE_DEVICES``, no state file: the test sets what it needs)."""
    spec = importlib.util.spec_from_file_location("pynvml", FAKE_NVML_DIR / "pynvml.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.configure(config)
    monkeypatch.setitem(sys.modules, "pynvml", module)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("FAKE_NVML_STATE", raising=False)
    return module


def fake_nvml_env(state_file: Path) -> dict[str, str]:
    """Environment for a server subprocess that imports the fake ``pynvml``."""
    return {
        "PYTHONPATH": os.pathsep.join([str(FAKE_NVML_DIR), str(REPO), os.environ.get("PYTHONPATH", "")]),
        "FAKE_NVML_STATE": str(state_file),
    }


def make_slow_model(folder: Path, seconds: float) -> Path:
    """A tiny Llama saved with custom code (``trust_remote_code``) that sleeps on SLOW_TOKEN."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1024,
        max_position_embeddings=4096,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_slow.SlowLlamaForCausalLM"}
    cfg["slow_forward_seconds"] = seconds
    cfg["slow_token_id"] = SLOW_TOKEN
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    (folder / "modeling_slow.py").write_text(_SLOW_MODELING)
    return folder


MODEL_ENV_KEYS = ("HF_HUB_OFFLINE", "HF_HOME", "TRANSFORMERS_VERBOSITY")


def offline_model_env(hf_home: Path) -> dict[str, str]:
    """Transformers offline, quiet, with its remote-code module cache in ``hf_home``.

    ``tests/conftest.py`` gives it to the whole session before any server starts: transformers
    reads it once, at import, so servers forked from the preloader share it.
    """
    return {"HF_HUB_OFFLINE": "1", "HF_HOME": str(hf_home), "TRANSFORMERS_VERBOSITY": "error"}


def model_env() -> dict[str, str]:
    """The session's offline transformers environment (:func:`offline_model_env`), for a server."""
    return {key: os.environ[key] for key in MODEL_ENV_KEYS}


def server(args: list[str], env: dict[str, str], log: Path, **kw: Any) -> ServerProcess:
    base = {"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return ServerProcess(args, env={**base, **env}, log_path=log, **kw)


def wait_until(condition: Callable[[], T], timeout: float = 20.0, interval: float = 0.05, what: str = "") -> T:
    """Poll until ``condition()`` is truthy (bounded); return its value."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or condition}")
        time.sleep(interval)


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str, headers: dict[str, str] | None = None) -> Samples:
    """GET /metrics parsed with prometheus-client's own parser: {(sample name, labels): value}."""
    resp = httpx.get(url + "/metrics", headers=headers, trust_env=False, timeout=10)
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("text/plain")
    out: Samples = {}
    for family in text_string_to_metric_families(resp.text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def metric(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value; 0.0 when absent (a labelled counter not yet incremented)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def vocab_mapping_body(vocab: int = 1024, draft: int = 256) -> bytes:
    ids, mask = vocab_mapping(vocab, draft, seed=1)
    return wire.encode({"selected_token_ids": ids, "selected_token_mask": mask})


def batch(batch_size: int, seq_len: int, *, slow: bool = False, seed: int = 0) -> dict[str, torch.Tensor]:
    """Unpadded rows, every position supervised; the first token marks the slow model's slow forward."""
    input_ids, attention_mask, loss_mask = padded_batch(
        1024, [seq_len] * batch_size, seq_len, seed, prompt_fraction=0.0
    )
    input_ids[0, 0] = SLOW_TOKEN if slow else 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}


def post(url: str, endpoint: str, content: bytes = b"", headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(
        url + "/" + endpoint,
        content=content,
        headers={"Content-Type": "application/octet-stream", **(headers or {})},
        trust_env=False,
        timeout=120,
    )


@contextmanager
def in_background(fn: Callable[[], T]) -> Iterator[dict[str, Any]]:
    """Run ``fn`` in a thread; the dict gets ``result``/``error`` and ``done`` (joined on exit)."""
    box: dict[str, Any] = {"done": False}

    def run() -> None:
        try:
            box["result"] = fn()
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            box["error"] = exc
        finally:
            box["done"] = True

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield box
    finally:
        thread.join(timeout=120)
