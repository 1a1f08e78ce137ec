"""Answers kept for a retry of a request id count in the resend store's memory budget."""

from __future__ import annotations

import torch

from eagle3_appliance.core.admission import Admission, Ticket
from eagle3_appliance.core.inputs import GenerateInputs
from eagle3_appliance.dataplanes.buffers import ServerBuffers
from eagle3_appliance.dataplanes.resend_store import ResendStore
from eagle3_appliance.dataplanes.transfer import WireTransfer
from eagle3_appliance.serving.jobs import Job, KeptAnswers
from eagle3_client.encodings import PROBS


def _job(request_id: str) -> Job:
    ids = torch.zeros(1, 4, dtype=torch.long)
    inputs = GenerateInputs(ids, torch.ones_like(ids), torch.ones_like(ids))
    job = Job(inputs, None, PROBS, WireTransfer(ServerBuffers(torch.device("cpu"), 0)), Ticket(Admission(max_queue=1)))
    job.key = ("session", request_id, b"digest")
    return job


def _answer(value: float, nbytes: int) -> dict[str, torch.Tensor]:
    return {"target_probs": torch.full((nbytes // 4,), value, dtype=torch.float32)}


def test_kept_answers_share_the_resend_budget_and_the_oldest_goes_first() -> None:
    store = ResendStore(1000)
    kept = KeptAnswers(store)
    a, b = _job("a"), _job("b")
    kept.keep(a, _answer(1.0, 600))
    assert store.describe()["held_bytes"] == 600
    kept.keep(b, _answer(2.0, 600))  # both do not fit: a's is dropped, b's kept
    assert store.describe() == {"budget_bytes": 1000, "held_bytes": 600, "held": 1, "dropped": 1}
    assert kept.take(_job("a")) is None  # a's retry computes again: never a wrong answer
    got = kept.take(_job("b"))
    assert got is not None and torch.equal(got["target_probs"], _answer(2.0, 600)["target_probs"])
    assert kept.take(_job("b")) is None  # once
    assert store.describe()["held_bytes"] == 0 and len(kept) == 0  # taken: the memory is given back


def test_an_answer_larger_than_the_budget_is_not_kept() -> None:
    store = ResendStore(100)
    kept = KeptAnswers(store)
    kept.keep(_job("big"), _answer(1.0, 400))
    assert kept.take(_job("big")) is None
    assert store.describe()["held_bytes"] == 0 and len(kept) == 0
