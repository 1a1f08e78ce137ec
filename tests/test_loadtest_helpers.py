"""The load tests' pure helpers (batches, answer checks, counters, capacity steps), without Locust.

These run in the main test session, so they also check that importing the helpers does
not import locust (which would monkey-patch this interpreter with gevent).
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest
import torch

from eagle3_appliance.core.inputs import VocabMapping
from eagle3_appliance.model.supervision import reference_projection
from eagle3_client.capture import Capture
from eagle3_loadtest._batches import BatchSpec, LengthDistribution, make_batch, make_vocab_mapping
from eagle3_loadtest._counters import SupervisionCounters
from eagle3_loadtest._steps import StepPlan, StepSearch, Window, evaluate_step, percentile
from eagle3_loadtest._validate import Expected, SupervisionError, check_streamed, check_supervision, payload_bytes

HIDDEN, VOCAB, DRAFT = 4, 50, 10


def test_helpers_do_not_import_locust() -> None:
    assert "locust" not in sys.modules
    assert "gevent" not in sys.modules


@pytest.mark.parametrize(
    ("spec", "low", "high"),
    [("fixed:7", 7, 7), ("uniform:3:9", 3, 9), ("normal:40:100", 1, 64), ("lognormal:20:1.5", 1, 64)],
)
def test_lengths_stay_within_their_bounds(spec: str, low: int, high: int) -> None:
    dist = LengthDistribution.parse(spec, max_len=64)
    rng = random.Random(0)
    draws = [dist.sample(rng) for _ in range(2000)]
    assert min(draws) >= low and max(draws) <= high
    if spec.startswith(("normal", "lognormal")):
        assert min(draws) == 1 and max(draws) == 64, "wide spreads must hit both clamps"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("zipf:1", "unknown length distribution"),
        ("uniform:5", "takes 2 parameter"),
        ("uniform:9:3", "LO <= HI"),
        ("fixed:x", "non-numeric"),
        ("normal:10:-1", "must not be negative"),
    ],
)
def test_bad_length_specs_are_rejected(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LengthDistribution.parse(spec, max_len=64)


def test_batches_are_right_padded_with_a_masked_prompt() -> None:
    spec = BatchSpec(4, LengthDistribution.parse("uniform:5:20", 32), vocab_size=VOCAB, prompt_fraction=0.25)
    batch = make_batch(spec, random.Random(1))
    ids, attention, loss = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
    lengths = attention.sum(dim=1)
    assert ids.dtype == attention.dtype == loss.dtype == torch.int64
    assert ids.shape[1] == int(lengths.max())  # padding="longest"
    for row, length in enumerate(lengths.tolist()):
        assert attention[row, :length].all() and not attention[row, length:].any()
        prompt = int(length * 0.25)
        assert not loss[row, :prompt].any() and loss[row, prompt:length].all() and not loss[row, length:].any()
        assert not ids[row, length:].any()
    assert 0 <= int(ids.min()) and int(ids.max()) < VOCAB


def test_max_padding_gives_fixed_shapes() -> None:
    spec = BatchSpec(3, LengthDistribution.parse("uniform:1:5", 16), vocab_size=VOCAB, padding="max")
    assert make_batch(spec, random.Random(2))["input_ids"].shape == (3, 16)


def test_vocab_mapping_is_the_same_for_the_same_seed() -> None:
    a, b = make_vocab_mapping(VOCAB, DRAFT, seed=3), make_vocab_mapping(VOCAB, DRAFT, seed=3)
    assert torch.equal(a["selected_token_ids"], b["selected_token_ids"])
    ids, mask = a["selected_token_ids"], a["selected_token_mask"]
    assert ids.numel() == DRAFT == int(mask.sum()) and bool(mask[ids].all())
    with pytest.raises(ValueError, match="draft vocab"):
        make_vocab_mapping(VOCAB, VOCAB + 1, seed=0)


def _answer(request: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A correct answer, computed with the appliance's own supervision math on random logits."""
    batch, seq_len = request["input_ids"].shape
    mapping = make_vocab_mapping(VOCAB, DRAFT, seed=0)
    gen = torch.Generator().manual_seed(0)
    return reference_projection(
        torch.randn(batch, seq_len, 3 * HIDDEN, generator=gen),
        torch.randn(batch, seq_len, VOCAB, generator=gen),
        request["input_ids"],
        request["loss_mask"],
        VocabMapping(mapping["selected_token_ids"], mapping["selected_token_mask"]),
    )


@pytest.fixture
def request_batch() -> dict[str, torch.Tensor]:
    spec = BatchSpec(2, LengthDistribution.parse("uniform:4:12", 12), vocab_size=VOCAB)
    return make_batch(spec, random.Random(4))


EXPECTED = Expected(hidden_size=HIDDEN, draft_vocab=DRAFT)


def test_a_correct_answer_passes(request_batch: dict[str, torch.Tensor]) -> None:
    answer = _answer(request_batch)
    check_supervision(answer, request_batch, EXPECTED)
    batch, seq_len = request_batch["input_ids"].shape
    assert payload_bytes(answer) == batch * seq_len * (3 * HIDDEN * 4 + DRAFT * 4 + 1 + 8 + 8)


def _swap_first_keys(a: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    keys = list(a)
    return {k: a[k] for k in [keys[1], keys[0], *keys[2:]]}


def _set_position_outside_loss(a: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    outside = a["loss_mask"] == 0
    return {**a, "position_mask": (a["position_mask"].squeeze(-1) | outside).unsqueeze(-1)}


BREAKAGES = {
    "key order": (_swap_first_keys, "expected exactly"),
    "extra key": (lambda a: {**a, "logits": a["target_probs"]}, "expected exactly"),
    "missing key": (lambda a: {k: v for k, v in a.items() if k != "loss_mask"}, "expected exactly"),
    "aux width": (
        lambda a: {**a, "aux_hidden_states": a["aux_hidden_states"][..., :-1]},
        "aux_hidden_states has shape",
    ),
    "aux dtype": (lambda a: {**a, "aux_hidden_states": a["aux_hidden_states"].double()}, "aux_hidden_states has dtype"),
    "aux NaN": (lambda a: {**a, "aux_hidden_states": a["aux_hidden_states"] * float("nan")}, "NaN"),
    "probs scaled": (lambda a: {**a, "target_probs": a["target_probs"] * 0.999}, "do not sum to 1"),
    "probs negative": (
        lambda a: {**a, "target_probs": a["target_probs"] - 2 * a["target_probs"] * (a["target_probs"] > 0.5)},
        "negative probability",
    ),
    "probs short": (lambda a: {**a, "target_probs": a["target_probs"][:, :-1]}, "target_probs has shape"),
    "probs bf16": (lambda a: {**a, "target_probs": a["target_probs"].bfloat16()}, "target_probs has dtype"),
    "mask dtype": (lambda a: {**a, "position_mask": a["position_mask"].long()}, "position_mask has dtype"),
    "mask outside loss": (_set_position_outside_loss, "where the shifted loss mask is 0"),
    "ids unshifted": (lambda a: {**a, "input_ids": a["input_ids"].roll(1, dims=1)}, "shifted left"),
    "loss unshifted": (lambda a: {**a, "loss_mask": 1 - a["loss_mask"]}, "loss_mask is not"),
}


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_each_kind_of_wrong_answer_is_caught(request_batch: dict[str, torch.Tensor], breakage: str) -> None:
    break_it, message = BREAKAGES[breakage]
    answer = _answer(request_batch)
    if breakage == "probs negative" and not bool((answer["target_probs"] > 0.5).any()):
        answer["target_probs"][0, 0] = torch.tensor([0.9] + [0.1 / (DRAFT - 1)] * (DRAFT - 1))
    with pytest.raises(SupervisionError, match=message):
        check_supervision(break_it(answer), request_batch, EXPECTED)


STREAMED_BREAKAGES = {k: BREAKAGES[k] for k in ("aux width", "aux dtype", "aux NaN", "probs scaled", "mask dtype")}
STREAMED_BREAKAGES["mask outside loss"] = (_set_position_outside_loss, "where the loss mask is 0")


@pytest.mark.parametrize("breakage", [None, *sorted(STREAMED_BREAKAGES)])
def test_a_streamed_batch_is_checked_without_its_request(
    request_batch: dict[str, torch.Tensor], breakage: str | None
) -> None:
    """A stream rank never sees the request: what the batch carries must agree with itself."""
    answer = _answer(request_batch)
    if breakage is None:
        check_streamed(answer, EXPECTED)
        return
    break_it, message = STREAMED_BREAKAGES[breakage]
    with pytest.raises(SupervisionError, match=message):
        check_streamed(break_it(answer), EXPECTED)


def test_probability_tolerance_is_1e_4(request_batch: dict[str, torch.Tensor]) -> None:
    answer = _answer(request_batch)
    answer["target_probs"][0, 0, 0] += 5e-5  # inside the tolerance
    check_supervision(answer, request_batch, EXPECTED)
    answer["target_probs"][0, 0, 0] += 1e-4  # now 1.5e-4 off
    with pytest.raises(SupervisionError, match="do not sum to 1"):
        check_supervision(answer, request_batch, EXPECTED)


def test_counters_merge_and_summarise() -> None:
    worker = SupervisionCounters()
    worker.record(response_bytes=1100, payload_bytes=1000, tokens=10, real_tokens=8)
    master = SupervisionCounters()
    master.merge(worker.take())
    master.merge({"responses": 1, "response_bytes": 1100, "payload_bytes": 1000, "tokens": 10, "real_tokens": 6})
    assert worker.snapshot()["responses"] == 0
    summary = master.summary(elapsed_s=2.0)
    assert summary["responses"] == 2 and summary["supervision_bytes_per_token"] == 100.0
    assert summary["tokens_per_second"] == 10.0 and summary["padding_fraction"] == pytest.approx(0.3)
    assert SupervisionCounters().summary(0.0)["tokens_per_second"] is None


def test_percentile_of_a_histogram() -> None:
    histogram = {10: 90, 200: 9, 5000: 1}
    assert percentile(histogram, 0.5) == 10.0
    assert percentile(histogram, 0.95) == 200.0
    assert percentile(histogram, 1.0) == 5000.0
    assert percentile({}, 0.95) is None


PLAN = StepPlan(
    start_users=2, step_users=2, max_users=6, step_duration_s=10, settle_s=2, p95_limit_ms=500, max_error_rate=0.01
)


def test_a_step_is_judged_on_its_own_requests_only() -> None:
    before = Window(0.0, requests=100, failures=5, response_times={100: 100}, tokens=1000)
    after = Window(8.0, requests=200, failures=5, response_times={100: 196, 900: 4}, tokens=9000)
    result = evaluate_step(PLAN, 2, before, after)
    assert (result.requests, result.failures, result.p95_ms, result.tokens_per_second) == (100, 0, 100.0, 1000.0)
    assert result.passed
    slow = Window(8.0, requests=200, failures=5, response_times={100: 180, 900: 20}, tokens=9000)
    assert evaluate_step(PLAN, 2, before, slow).reason == "p95 900 ms > 500 ms"
    failing = Window(8.0, requests=200, failures=7, response_times={100: 200}, tokens=9000)
    assert evaluate_step(PLAN, 2, before, failing).reason == "error rate 0.020 > 0.01"
    assert not evaluate_step(PLAN, 2, before, before).passed


class FakeLoad:
    """Cumulative stats where every request takes ``latency_ms(users)``, 10 requests per user-second."""

    def __init__(self, latency_ms: dict[int, int]) -> None:
        self.latency_ms = latency_ms
        self.now = 0.0
        self.users = 0
        self.requests = 0
        self.histogram: dict[int, int] = {}

    def advance(self, seconds: float) -> None:
        done = int(10 * self.users * seconds)
        self.requests += done
        latency = self.latency_ms[self.users]
        self.histogram[latency] = self.histogram.get(latency, 0) + done
        self.now += seconds

    def window(self) -> Window:
        return Window(self.now, self.requests, 0, dict(self.histogram), self.requests * 100)


def _drive(search: StepSearch, load: FakeLoad, limit_s: float = 100) -> list[int]:
    seen = []
    while load.now < limit_s:
        users = search.tick(load.now, load.window)
        if users is None:
            return seen
        load.users = users
        seen.append(users)
        load.advance(1.0)
    raise AssertionError("the search did not stop by itself")


def test_the_search_stops_at_the_first_failing_step() -> None:
    search = StepSearch(PLAN)
    seen = _drive(search, FakeLoad({2: 100, 4: 300, 6: 800}))
    assert search.capacity_users == 4
    assert [r.users for r in search.results] == [2, 4, 6]
    assert search.stop_reason == "step at 6 users failed: p95 800 ms > 500 ms"
    assert seen.count(2) == 10 and seen.count(4) == 10  # each step lasts its duration


def test_the_search_stops_at_max_users_when_every_step_passes() -> None:
    search = StepSearch(PLAN)
    _drive(search, FakeLoad({2: 100, 4: 100, 6: 100}))
    assert search.capacity_users == 6 and search.stop_reason == "reached max users (6)"
    assert search.summary()["capacity_users"] == 6


def test_capacity_is_zero_when_the_first_step_fails() -> None:
    search = StepSearch(PLAN)
    _drive(search, FakeLoad({2: 1000}))
    assert search.capacity_users == 0 and len(search.results) == 1


@pytest.mark.parametrize(
    "kwargs",
    [{"start_users": 0}, {"max_users": 1}, {"settle_s": 10}, {"max_error_rate": 2.0}, {"p95_limit_ms": -1}],
)
def test_impossible_plans_are_rejected(kwargs: dict[str, float]) -> None:
    base = dict(
        start_users=2, step_users=2, max_users=6, step_duration_s=10, settle_s=2, p95_limit_ms=0, max_error_rate=0
    )
    with pytest.raises(ValueError):
        StepPlan(**{**base, **kwargs})  # type: ignore[arg-type]


DFLASH_EXPECTED = Expected(
    hidden_size=HIDDEN, draft_vocab=DRAFT, capture=Capture.parse("dflash+logits:0,2"), vocab_size=VOCAB
)


def _dflash_answer(request: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    batch, seq_len = request["input_ids"].shape
    return {"hidden_states": torch.randn(batch, seq_len, 2 * HIDDEN), "logits": torch.randn(batch, seq_len, VOCAB)}


def test_a_dflash_answer_is_checked_by_its_capture(request_batch: dict[str, torch.Tensor]) -> None:
    answer = _dflash_answer(request_batch)
    check_supervision(answer, request_batch, DFLASH_EXPECTED)
    broken = {
        "no logits": ({"hidden_states": answer["hidden_states"]}, "expected exactly"),
        "one layer": ({**answer, "hidden_states": answer["hidden_states"][..., :HIDDEN]}, "hidden_states has shape"),
        "short logits": ({**answer, "logits": answer["logits"][..., :DRAFT]}, "logits has shape"),
        "NaN": ({**answer, "hidden_states": answer["hidden_states"] * float("nan")}, "NaN"),
    }
    for bad, message in broken.values():
        with pytest.raises(SupervisionError, match=message):
            check_supervision(bad, request_batch, DFLASH_EXPECTED)


def test_an_eagle_answer_is_its_last_hidden_state_and_logits(request_batch: dict[str, torch.Tensor]) -> None:
    """``--capture eagle``: the final norm's output [B,T,H] then the logits [B,T,V], nothing else."""
    expected = Expected(hidden_size=HIDDEN, draft_vocab=DRAFT, capture=Capture.eagle(), vocab_size=VOCAB)
    batch, seq_len = request_batch["input_ids"].shape
    answer = {"last_hidden_states": torch.randn(batch, seq_len, HIDDEN), "logits": torch.randn(batch, seq_len, VOCAB)}
    check_supervision(answer, request_batch, expected)
    broken = {
        "no logits": ({"last_hidden_states": answer["last_hidden_states"]}, "expected exactly"),
        "order": ({"logits": answer["logits"], "last_hidden_states": answer["last_hidden_states"]}, "expected"),
        "wide": ({**answer, "last_hidden_states": torch.randn(batch, seq_len, 2 * HIDDEN)}, "has shape"),
        "NaN": ({**answer, "last_hidden_states": answer["last_hidden_states"] * float("nan")}, "NaN"),
    }
    for bad, message in broken.values():
        with pytest.raises(SupervisionError, match=message):
            check_supervision(bad, request_batch, expected)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("eagle3", Capture()),
        ("eagle", Capture.eagle()),
        ("dflash:1,3,5", Capture.dflash([1, 3, 5])),
        (" dflash+logits:7,0 ", Capture.dflash([7, 0], logits=True)),
    ],
)
def test_capture_spellings_round_trip(text: str, expected: Capture) -> None:
    assert Capture.parse(text) == expected and Capture.parse(expected.spec) == expected


@pytest.mark.parametrize("text", ["dflash", "dflash:", "dflash:a,b", "medusa:1", "dflash+probs:1"])
def test_a_bad_capture_spelling_names_the_problem(text: str) -> None:
    with pytest.raises(ValueError, match="capture"):
        Capture.parse(text)


def test_each_step_reports_answers_per_second_and_its_percentiles() -> None:
    search = StepSearch(PLAN)
    _drive(search, FakeLoad({2: 100, 4: 300, 6: 800}))
    first = search.results[0]
    assert first.p50_ms == 100 and first.p99_ms == 100 and first.p95_ms == 100
    assert first.answers_per_second is not None and first.answers_per_second > 0
    assert first.answers_per_second == first.requests / (PLAN.step_duration_s - PLAN.settle_s)


def test_the_capacity_plot_draws_every_step_and_marks_the_knee(tmp_path: Path) -> None:
    from eagle3_loadtest._plot import capacity_figure, plot_path, save_capacity_plot

    search = StepSearch(PLAN)
    _drive(search, FakeLoad({2: 100, 4: 300, 6: 800}))
    summary = search.summary()
    fig = capacity_figure(summary)
    top, bottom = fig.axes
    answers = top.lines[0]
    assert list(answers.get_xdata()) == [2, 4, 6]
    assert list(answers.get_ydata()) == [r.answers_per_second for r in search.results]
    p50, p99 = bottom.lines[0], bottom.lines[1]
    assert list(p50.get_ydata()) == [100, 300, 800] and list(p99.get_ydata()) == [100, 300, 800]
    knee = [line for line in top.lines if line.get_label() == "capacity: 4 ranks"]
    assert len(knee) == 1 and list(knee[0].get_xdata()) == [4, 4]
    assert [line.get_ydata()[0] for line in bottom.lines if line.get_label() == "p95 limit 500 ms"] == [500]

    path = save_capacity_plot(summary, plot_path(str(tmp_path / "run"), None) or tmp_path / "x.png")
    assert path == tmp_path / "run_capacity.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_path(None, str(tmp_path / "r.json")) == tmp_path / "r_capacity.png"
    assert plot_path(None, None) is None


def test_packed_batches_fill_rows_like_the_recipe() -> None:
    lengths = LengthDistribution.parse("uniform:5:40", 64)
    spec = BatchSpec(batch_size=3, lengths=lengths, vocab_size=1024, packed_sequence_size=64)
    batch = make_batch(spec, random.Random(0))
    assert batch["input_ids"].shape == batch["position_ids"].shape == batch["doc_remaining"].shape == (3, 64)
    assert batch["seq_lens"].sum(1).tolist() == [64, 64, 64]  # the pad counts to the last document
    assert int((batch["seq_lens"] > 0).sum()) > 3  # several documents per row
    for row in range(3):
        docs = [int(n) for n in batch["seq_lens"][row] if n > 0]
        starts = [sum(docs[:i]) for i in range(len(docs))]
        assert all(int(batch["position_ids"][row, s]) == 0 for s in starts)  # positions restart per document
        real = int(batch["attention_mask"][row].sum())
        first = docs[0] if len(docs) > 1 else real  # a lone document's length in seq_lens includes the pad
        assert int(batch["doc_remaining"][row, real - 1]) == 0 and int(batch["doc_remaining"][row, 0]) == first - 1
