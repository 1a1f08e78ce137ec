"""Prometheus metrics move by exactly the right amounts; every limit refuses with a clear status."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from eagle3_client import wire
from tests.ops_support import (
    Samples,
    batch,
    fake_nvml_env,
    healthy_gpus,
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


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("metrics")
    model = make_slow_model(tmp / "slow-model", 6.0)
    state_file = tmp / "nvml.json"
    write_state(state_file, {"gpus": healthy_gpus()[:1]})
    args = [
        "--model",
        str(model),
        "--trust-remote-code",
        "--request-timeout",
        "3",  # generous for the fast requests on a busy machine; the slow one takes 6 s
        "--max-body-bytes",
        "65536",
        "--max-batch-tokens",
        "512",
        "--max-seq-len",
        "256",
    ]
    with server(args, {**fake_nvml_env(state_file), **model_env()}, tmp / "server.log") as proc:
        assert post(proc.url, "set_vocab_mapping", vocab_mapping_body(draft=200)).status_code == 200
        yield proc.url


def delta(after: Samples, before: Samples, name: str, **labels: str) -> float:
    return metric(after, name, **labels) - metric(before, name, **labels)


def test_generate_counters_histograms_and_bytes_move_by_exact_amounts(url: str) -> None:
    shapes = [(2, 16), (1, 32), (3, 8)]
    before = scrape(url)
    sizes = []
    for i, (b, t) in enumerate(shapes):
        resp = post(url, "generate", wire.encode(batch(b, t, seed=i)))
        assert resp.status_code == 200, resp.text
        assert int(resp.headers["content-length"]) == len(resp.content)
        decoded = wire.decode(resp.content)
        assert decoded["target_probs"].shape == (b, t, 200)
        sizes.append(len(resp.content))
    after = scrape(url)

    assert delta(after, before, "eagle3_request_success_total", endpoint="generate") == 3
    assert delta(after, before, "eagle3_inference_exec_count_total") == 3
    assert delta(after, before, "eagle3_inference_count_total") == 2 + 1 + 3
    assert delta(after, before, "eagle3_inference_tokens_total") == 2 * 16 + 1 * 32 + 3 * 8
    assert delta(after, before, "eagle3_response_bytes_total", data_plane="wire", encoding="probs") == sum(sizes)
    for phase in ("queue", "forward", "encode", "send"):
        assert delta(after, before, f"eagle3_inference_{phase}_duration_seconds_count") == 3, phase
        assert delta(after, before, f"eagle3_inference_{phase}_duration_seconds_sum") >= 0, phase
        assert metric(after, f"eagle3_inference_{phase}_duration_seconds_bucket", le="+Inf") == metric(
            after, f"eagle3_inference_{phase}_duration_seconds_count"
        )
    assert delta(after, before, "eagle3_request_duration_seconds_count", endpoint="generate") == 3
    assert metric(after, "eagle3_inflight_requests") == 0
    assert metric(after, "eagle3_inference_pending_request_count") == 0
    # The scrape itself is counted once it has been answered.
    assert delta(scrape(url), after, "eagle3_request_success_total", endpoint="metrics") == 1
    # NVML gauges from the fake GPU, DCGM-named.
    gpu = healthy_gpus()[0]
    assert metric(after, "DCGM_FI_DEV_GPU_TEMP", gpu="0", UUID=gpu["uuid"], modelName=gpu["name"]) == 41


def test_each_limit_refuses_with_a_clear_status_and_is_counted(url: str) -> None:
    before = scrape(url)
    too_many = post(url, "generate", wire.encode(batch(3, 200)))  # 600 tokens > 512
    assert too_many.status_code == 422
    assert "600 tokens exceed this server's maximum of 512" in too_many.json()["error"]
    too_long = post(url, "generate", wire.encode(batch(1, 300)))  # 300 > max seq len 256
    assert too_long.status_code == 422 and "exceeds this server's maximum of 256" in too_long.json()["error"]
    too_big = post(url, "generate", b"\0" * 70_000)
    assert too_big.status_code == 413
    assert too_big.json()["status"] == 413
    malformed = post(url, "generate", b"not a wire blob")
    assert malformed.status_code == 400 and "malformed" in malformed.json()["error"]
    unknown = httpx.get(url + "/no/such/endpoint", trust_env=False)
    assert unknown.status_code == 404
    after = scrape(url)
    assert delta(after, before, "eagle3_request_failure_total", endpoint="generate", status="422") == 2
    assert delta(after, before, "eagle3_request_failure_total", endpoint="generate", status="413") == 1
    assert delta(after, before, "eagle3_request_failure_total", endpoint="generate", status="400") == 1
    assert delta(after, before, "eagle3_request_failure_total", endpoint="unmatched", status="404") == 1
    assert delta(after, before, "eagle3_request_success_total", endpoint="generate") == 0
    assert delta(after, before, "eagle3_inference_exec_count_total") == 0


def test_request_time_limit_answers_503_and_the_next_request_still_works(url: str) -> None:
    before = scrape(url)
    slow = post(url, "generate", wire.encode(batch(1, 8, slow=True)))  # sleeps 6 s > --request-timeout 3
    assert slow.status_code == 503
    assert "request time limit of 3 s" in slow.json()["error"]
    assert int(slow.headers["retry-after"]) >= 1
    # The abandoned forward still holds the model thread for a moment; then the server works as before.
    wait_until(lambda: metric(scrape(url), "eagle3_inference_computing") == 0, what="the model thread to finish")
    fast = post(url, "generate", wire.encode(batch(1, 8)))
    assert fast.status_code == 200, fast.text
    after = scrape(url)
    assert delta(after, before, "eagle3_request_failure_total", endpoint="generate", status="503") == 1
    assert delta(after, before, "eagle3_request_success_total", endpoint="generate") == 1
    assert metric(after, "eagle3_inflight_requests") == 0
