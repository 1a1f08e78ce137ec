"""Upstream's EAGLE-3 draft trainer learns exactly the same from our appliance as from a co-located target.

A few real optimizer steps of ``Eagle3TrainerModule`` (upstream's TTT unroll and loss) on
upstream's Llama draft, from the same initial weights and the same batches, fed once by
upstream's co-located ``HFEagle3TargetModel`` and once by our appliance through our client.
The two runs take different trainer code paths on purpose, which is what a user switching
``target_model_backend`` gets: co-located batches carry full-vocabulary ``logits`` that the
trainer projects itself, remote batches carry ``target_probs``/``position_mask`` projected by
the server. The losses must be equal step for step and the final weights bit for bit.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from eagle3_appliance.launch import ServerProcess
from eagle3_client import RemoteEagle3TargetModel
from eagle3_client.synthetic import random_batch, vocab_mapping
from tests.integration.automodel_support import build_draft, import_or_skip, load_colocated

core = import_or_skip("nemo_automodel.components.speculative.eagle.core")
import_or_skip("nemo_automodel.components.speculative.eagle.draft_llama")

VOCAB = 1024
DRAFT_VOCAB = 384
STEPS = 5
TTT_STEPS = 3


@pytest.fixture(scope="module")
def appliance(appliances: list[ServerProcess]) -> ServerProcess:
    return appliances[0]


def make_batches() -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Padded batches whose loss mask covers an answer after a prompt, as the recipe's data does."""
    batches = []
    for step in range(STEPS):
        input_ids, attention_mask, _ = random_batch(VOCAB, 2, 24 + 4 * step, seed=300 + step, pad=True)
        loss_mask = attention_mask.clone()
        loss_mask[:, :6] = 0  # the prompt
        batches.append((input_ids, attention_mask, loss_mask))
    return batches


def train(
    backend: object, draft: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor
) -> tuple[list[torch.Tensor], dict[str, torch.Tensor], list[str]]:
    """The recipe's per-step work: supervision, unrolled loss, backward, clip, AdamW step."""
    draft.copy_embeddings_from_target(backend.get_input_embeddings())  # type: ignore[attr-defined]
    draft.set_vocab_mapping(ids)
    draft.freeze_embeddings()
    backend.set_vocab_mapping(ids, mask)  # type: ignore[attr-defined]
    trainer = core.Eagle3TrainerModule(draft, selected_token_ids=ids, selected_token_mask=mask, ttt_steps=TTT_STEPS)
    optimizer = torch.optim.AdamW([p for p in trainer.parameters() if p.requires_grad], lr=3e-3, betas=(0.9, 0.95))
    losses, encodings = [], []
    for inputs in make_batches():
        target_batch = backend.generate_batch(*inputs)  # type: ignore[attr-defined]
        encodings.append("logits" if target_batch.logits is not None else "target_probs")
        metrics = trainer(**target_batch.to_trainer_inputs())
        metrics.loss.backward()
        torch.nn.utils.clip_grad_norm_(trainer.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(metrics.loss.detach().clone())
    return losses, {k: v.detach().clone() for k, v in draft.state_dict().items()}, encodings


def test_losses_and_weights_match_the_colocated_target_step_for_step(appliance: ServerProcess, model_dir: Path) -> None:
    colocated = load_colocated(model_dir)
    ids, mask = vocab_mapping(VOCAB, DRAFT_VOCAB, seed=11)  # unsorted, compressed vocab
    initial = build_draft(colocated.model.config, DRAFT_VOCAB, seed=0)

    local_losses, local_weights, local_enc = train(colocated, copy.deepcopy(initial), ids, mask)
    with RemoteEagle3TargetModel.from_urls([appliance.url], device="cpu") as remote:
        remote_losses, remote_weights, remote_enc = train(remote, copy.deepcopy(initial), ids, mask)

    assert local_enc == ["logits"] * STEPS and remote_enc == ["target_probs"] * STEPS
    # The run trains for real: finite, supervised, changing losses and moving weights.
    assert all(torch.isfinite(loss) and loss > 0 for loss in local_losses)
    assert len({loss.item() for loss in local_losses}) == STEPS
    assert not torch.equal(local_weights["model.fc.weight"], initial.state_dict()["model.fc.weight"])

    for step, (a, b) in enumerate(zip(local_losses, remote_losses, strict=True)):
        assert torch.equal(a, b), f"step {step}: co-located loss {a.item()!r} != remote loss {b.item()!r}"
    assert local_weights.keys() == remote_weights.keys()
    differing = [k for k in local_weights if not torch.equal(local_weights[k], remote_weights[k])]
    assert differing == []
