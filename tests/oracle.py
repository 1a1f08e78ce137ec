"""An independent in-process reference for the supervision, written straight from protocol §1.

It shares no code with the appliance: the aux layers come from transformers'
``output_hidden_states`` (entry ``i + 1`` is the output of decoder layer ``i``) instead of
forward hooks, and the projection is written out literally in upstream's order (shift the
full-vocabulary logits first, then argmax / index_select / softmax).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM


def shift(x: torch.Tensor) -> torch.Tensor:
    return torch.cat((x[:, 1:], torch.zeros_like(x[:, :1])), dim=1)


class Oracle:
    def __init__(self, model_dir: Path) -> None:
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        n = self.model.config.num_hidden_layers
        self.aux_layer_ids = [1, n // 2 - 1, n - 4]
        self.vocab_size = self.model.config.vocab_size

    @torch.no_grad()
    def supervision(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        loss_mask: torch.Tensor,
        selected_token_ids: torch.Tensor,
        selected_token_mask: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        aux = torch.cat([out.hidden_states[i + 1] for i in self.aux_layer_ids], dim=-1)
        logits = shift(out.logits)
        shifted_loss_mask = shift(loss_mask)
        top = logits.argmax(dim=-1)
        position_mask = (selected_token_mask[top] & shifted_loss_mask.bool()).unsqueeze(-1)
        target_probs = torch.softmax(logits.index_select(-1, selected_token_ids).float(), dim=-1)
        return {
            "aux_hidden_states": aux,
            "target_probs": target_probs,
            "position_mask": position_mask,
            "input_ids": shift(input_ids),
            "loss_mask": shifted_loss_mask,
        }


def assert_bit_exact(got: dict[str, torch.Tensor] | object, expected: dict[str, torch.Tensor]) -> None:
    """Same keys, dtypes, shapes and bits (``got`` may be a batch object with these attributes)."""
    for key, want in expected.items():
        have = got[key] if isinstance(got, dict) else getattr(got, key)
        have = have.cpu()
        assert have.dtype == want.dtype, f"{key}: dtype {have.dtype} != {want.dtype}"
        assert have.shape == want.shape, f"{key}: shape {tuple(have.shape)} != {tuple(want.shape)}"
        if not torch.equal(have, want):
            diff = (have.double() - want.double()).abs().max().item()
            raise AssertionError(f"{key}: values differ (max abs diff {diff})")
