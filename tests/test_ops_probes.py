"""Probes, GPU health and back-pressure on a real server with a fake NVML and a slow model.

One server for the module (starting one costs seconds): the tests run in file order and
the XID test comes last, because an XID is remembered for the server's lifetime.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from eagle3_client import RemoteEagle3TargetModel, wire
from tests.ops_support import (
    batch,
    fake_nvml_env,
    healthy_gpus,
    in_background,
    make_slow_model,
    metric,
    model_env,
    post,
    scrape,
    server,
    vocab_mapping_body,
    wait_until,
    write_state,
)

SLOW_SECONDS = 3.0


class Env:
    def __init__(self, url: str, state_file: Path, model: Path) -> None:
        self.url = url
        self.state_file = state_file
        self.model = model
        self.gpus = healthy_gpus()
        self.xids: list[dict[str, int]] = []

    def publish(self) -> None:
        write_state(self.state_file, {"driver_version": "550.54.15", "gpus": self.gpus, "xid_events": self.xids})

    def ready(self) -> httpx.Response:
        return httpx.get(self.url + "/health/ready", trust_env=False, timeout=10)

    def gpus_json(self) -> dict:
        return httpx.get(self.url + "/gpus", trust_env=False, timeout=10).json()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("probes")
    model = make_slow_model(tmp / "slow-model", SLOW_SECONDS)
    state_file = tmp / "nvml.json"
    e = Env("", state_file, model)
    e.publish()
    args = ["--model", str(model), "--trust-remote-code", "--max-queue", "0", "--gpu-poll-interval", "0.2"]
    proc = server(args, {**fake_nvml_env(state_file), **model_env()}, tmp / "server.log")
    with proc:
        e.url = proc.url
        assert post(e.url, "set_vocab_mapping", vocab_mapping_body()).status_code == 200
        yield e


def _generate_slow(url: str) -> httpx.Response:
    return post(url, "generate", wire.encode(batch(1, 16, slow=True)))


def _forward_running(url: str) -> bool:
    return metric(scrape(url), "eagle3_inference_computing") == 1


def test_probes_answer_within_100ms_while_a_slow_forward_runs(env: Env) -> None:
    paths = ["/health/live", "/health/ready", "/v2/health/live", "/v2/health/ready", "/health"]
    with httpx.Client(trust_env=False, timeout=10) as http, in_background(lambda: _generate_slow(env.url)) as gen:
        wait_until(lambda: _forward_running(env.url), what="the slow forward to start")
        latencies: dict[str, list[float]] = {p: [] for p in paths}
        for _ in range(4):
            for p in paths:
                t0 = time.perf_counter()
                resp = http.get(env.url + p)
                latencies[p].append(time.perf_counter() - t0)
                assert resp.status_code == 200, (p, resp.text)
        # The forward sleeps 3 s: it must still be running, so every probe overlapped it.
        assert not gen["done"], "the forward ended before the probes did; the measurement proves nothing"
        worst = {p: max(v) for p, v in latencies.items()}
        print("probe latency during a forward (max of 4, ms):", {p: round(v * 1e3, 2) for p, v in worst.items()})
        assert max(worst.values()) < 0.100, worst
    assert gen["result"].status_code == 200


def test_gpus_reports_readings_unsupported_fields_and_throttling(env: Env) -> None:
    env.gpus[1]["unsupported"] = ["power_draw", "ecc", "remapped_rows"]
    env.gpus[0]["clocks_event_reasons"] = 0x4 | 0x40  # sw power cap + hw thermal slowdown
    env.publish()
    report = wait_until(
        lambda: (r := env.gpus_json())["gpus"] and r["gpus"][0]["clocks_event_reasons_mask"] == 0x44 and r,
        what="/gpus to show the throttling",
    )
    assert report["nvml"] is True and report["driver_version"] == "550.54.15"
    g0, g1 = report["gpus"]
    assert g0["name"] == "NVIDIA H100 80GB HBM3" and g0["uuid"].startswith("GPU-1111")
    assert (g0["memory_used_bytes"], g0["memory_total_bytes"]) == (10 * 1024**3, 80 * 1024**3)
    assert (g0["utilization_gpu_percent"], g0["temperature_c"]) == (37, 41)
    assert (g0["power_draw_w"], g0["power_limit_w"]) == (123.456, 700.0)
    assert g0["clocks_event_reasons"] == ["sw_power_cap", "hw_thermal_slowdown"]
    assert g0["unsupported"] == [] and g0["errors"] == {} and g0["fatal"] == []
    # Unsupported readings are reported as such, not as errors.
    assert g1["power_draw_w"] is None and g1["ecc_uncorrected_volatile"] is None
    assert sorted(g1["unsupported"]) == ["ecc_uncorrected_volatile", "power_draw", "remapped_rows"]
    assert g1["errors"] == {} and g1["power_limit_w"] == 350.0
    assert env.ready().status_code == 200  # throttling is not fatal

    s = scrape(env.url)
    lab0 = {"gpu": "0", "UUID": g0["uuid"], "modelName": g0["name"]}
    lab1 = {"gpu": "1", "UUID": g1["uuid"], "modelName": g1["name"]}
    assert metric(s, "DCGM_FI_DEV_GPU_TEMP", **lab0) == 41
    assert metric(s, "DCGM_FI_DEV_POWER_USAGE", **lab0) == pytest.approx(123.456)
    assert metric(s, "DCGM_FI_DEV_FB_USED", **lab0) == 10 * 1024
    assert metric(s, "DCGM_FI_DEV_FB_FREE", **lab0) == 70 * 1024
    assert metric(s, "DCGM_FI_DEV_GPU_UTIL", **lab0) == 37
    assert metric(s, "DCGM_FI_DEV_CLOCKS_EVENT_REASONS", **lab0) == 0x44
    assert metric(s, "eagle3_gpu_clocks_event_reason", **lab0, reason="hw_thermal_slowdown") == 1
    assert metric(s, "eagle3_gpu_clocks_event_reason", **lab0, reason="hw_slowdown") == 0
    assert ("DCGM_FI_DEV_POWER_USAGE", frozenset(lab1.items())) not in s  # unsupported: absent
    assert metric(s, "DCGM_FI_DEV_ENFORCED_POWER_LIMIT", **lab1) == 350
    assert metric(s, "eagle3_nvml_available") == 1 and metric(s, "eagle3_ready") == 1


def _not_ready_with(env: Env, fragment: str) -> dict | None:
    resp = env.ready()
    if resp.status_code == 503 and any(fragment in r for r in resp.json()["reasons"]):
        return resp.json()
    return None


def test_uncorrected_ecc_errors_make_the_server_unready_until_cleared(env: Env) -> None:
    env.gpus[0]["ecc_uncorrected_volatile"] = 2
    env.publish()
    body = wait_until(lambda: _not_ready_with(env, "uncorrected ECC"), what="readiness to flip on ECC errors")
    assert body["status"] == "not_ready"
    assert body["reasons"] == [
        f"fatal GPU condition: gpu 0 ({env.gpus[0]['uuid']}): 2 volatile uncorrected ECC error(s)"
    ]
    assert httpx.get(env.url + "/v2/health/ready", trust_env=False).status_code == 503
    assert httpx.get(env.url + "/health", trust_env=False).json() == {"status": "ok"}  # upstream's probe unchanged
    assert httpx.get(env.url + "/health/live", trust_env=False).status_code == 200
    s = scrape(env.url)
    assert metric(s, "eagle3_ready") == 0
    assert (
        metric(s, "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL", gpu="0", UUID=env.gpus[0]["uuid"], modelName=env.gpus[0]["name"])
        == 2
    )
    assert metric(s, "eagle3_gpu_fatal", gpu="0", UUID=env.gpus[0]["uuid"], modelName=env.gpus[0]["name"]) == 1

    env.gpus[0]["ecc_uncorrected_volatile"] = 0
    env.publish()
    wait_until(lambda: env.ready().status_code == 200, what="readiness to recover")
    assert metric(scrape(env.url), "eagle3_ready") == 1


def test_row_remap_failure_makes_the_server_unready(env: Env) -> None:
    env.gpus[1].pop("unsupported", None)
    env.gpus[1]["remapped_rows"] = [0, 1, 0, 1]
    env.publish()
    body = wait_until(lambda: _not_ready_with(env, "row-remap failure"), what="readiness to flip on remap failure")
    assert body["reasons"] == [f"fatal GPU condition: gpu 1 ({env.gpus[1]['uuid']}): row-remap failure"]
    report = env.gpus_json()
    assert report["gpus"][1]["remapped_rows_failure"] is True and report["fatal"]
    env.gpus[1]["remapped_rows"] = [0, 0, 1, 0]  # pending only: needs a reset, but not fatal
    env.publish()
    wait_until(lambda: env.ready().status_code == 200, what="readiness to recover")
    assert env.gpus_json()["gpus"][1]["remapped_rows_pending"] is True


def test_full_queue_answers_503_with_retry_after_and_our_client_waits(env: Env) -> None:
    before = scrape(env.url)
    with RemoteEagle3TargetModel.from_urls([env.url], max_retries=6, backoff=0.2) as remote:
        ids = torch.arange(0, 1024, 4)
        mask = torch.zeros(1024, dtype=torch.bool)
        mask[ids] = True
        remote.set_vocab_mapping(ids, mask)  # before the slow forward: it runs on the model thread too
        with in_background(lambda: _generate_slow(env.url)) as first:
            wait_until(lambda: _forward_running(env.url), what="the slow forward to start")
            refused = post(env.url, "generate", wire.encode(batch(1, 16)))
            assert refused.status_code == 503
            assert int(refused.headers["retry-after"]) >= 1
            assert "busy" in refused.json()["error"]
            # Our client honours Retry-After: it waits and retries until the model is free.
            inputs = batch(2, 8, seed=3)
            result = remote.generate_batch(inputs["input_ids"], inputs["attention_mask"], inputs["loss_mask"])
    assert first["result"].status_code == 200
    assert result.target_probs.shape == (2, 8, 256) and result.aux_hidden_states.shape == (2, 8, 192)
    after = scrape(env.url)
    refusals = metric(after, "eagle3_request_failure_total", endpoint="generate", status="503") - metric(
        before, "eagle3_request_failure_total", endpoint="generate", status="503"
    )
    assert refusals >= 2  # the raw request and at least one of the client's attempts
    successes = metric(after, "eagle3_request_success_total", endpoint="generate") - metric(
        before, "eagle3_request_success_total", endpoint="generate"
    )
    assert successes == 2


def test_xid_79_makes_the_server_unready_and_shows_in_metrics(env: Env) -> None:
    env.xids += [{"gpu": 1, "xid": 13}, {"gpu": 0, "xid": 79}]  # 13: an application error, not fatal
    env.publish()
    body = wait_until(lambda: _not_ready_with(env, "xid 79"), what="readiness to flip on XID 79")
    assert body["reasons"] == [
        f"fatal GPU condition: gpu 0 ({env.gpus[0]['uuid']}): xid 79 (GPU has fallen off the bus)"
    ]
    report = env.gpus_json()
    assert [(e["xid"], e["fatal"]) for e in report["gpus"][0]["xid_events"]] == [(79, True)]
    assert [(e["xid"], e["fatal"]) for e in report["gpus"][1]["xid_events"]] == [(13, False)]
    s = scrape(env.url)
    lab0 = {"gpu": "0", "UUID": env.gpus[0]["uuid"], "modelName": env.gpus[0]["name"]}
    lab1 = {"gpu": "1", "UUID": env.gpus[1]["uuid"], "modelName": env.gpus[1]["name"]}
    assert metric(s, "DCGM_FI_DEV_XID_ERRORS", **lab0) == 79
    assert metric(s, "DCGM_FI_DEV_XID_ERRORS", **lab1) == 13
    assert metric(s, "eagle3_gpu_xid_errors_total", **lab0, xid="79") == 1
    assert metric(s, "eagle3_gpu_fatal", **lab0) == 1 and metric(s, "eagle3_gpu_fatal", **lab1) == 0
    assert metric(s, "eagle3_ready") == 0
