"""How far a tensor-parallel answer may be from the single-device one, and the check that says so.

Tensor parallelism splits every projection's reduction over the ranks and adds the partial
sums in an all-reduce: the same mathematics in another order, so the answers differ from one
device's in the last bits, and those differences grow through the layers. The bounds below are
what docs/large-targets.md documents (measured with ``python -m benchmarks.numerics``); a
served answer of a ``tp=N`` server is correct when it is within them:

* ``aux_hidden_states``: ``max |served - reference| <= aux_rel * max |reference|``;
* ``target_probs``: ``max |served - reference| <= probs_abs``;
* ``position_mask``: equal, except where the reference's two largest logits of that position
  are within ``tie_gap`` of each other (a near-tie, whose argmax the reduction order decides);
* ``input_ids`` and ``loss_mask``: bit-exact (they do not depend on the model).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from eagle3_appliance.core.inputs import GenerateInputs, VocabMapping
from eagle3_appliance.model.projection import shift_left
from eagle3_appliance.model.supervision import reference_projection
from eagle3_appliance.model.target import Target

__all__ = [
    "TP_TOLERANCES",
    "Deviation",
    "Tolerance",
    "measure",
    "reference_and_tie_gaps",
    "reference_tie_gaps",
    "tolerance_for",
]


@dataclass(frozen=True)
class Tolerance:
    """The documented bounds of a tensor-parallel answer (see the module docstring)."""

    aux_rel: float
    probs_abs: float
    tie_gap: float


# Per model dtype. Measured on the CPU with 2 ranks (docs/large-targets.md has the table):
# float32 aux 3.6e-6 of max, probs 6.7e-6, no mask flip; bfloat16 aux 0.05 of max, probs
# 0.055, mask flips only at top-2 gaps <= 0.125 (two bfloat16 steps at the logits' magnitude).
# float16 aux 0.0056 of max, probs 0.0081, one flip at a gap of 0.0078.
TP_TOLERANCES: dict[torch.dtype, Tolerance] = {
    torch.float32: Tolerance(aux_rel=1e-4, probs_abs=1e-4, tie_gap=1e-3),
    torch.bfloat16: Tolerance(aux_rel=0.1, probs_abs=0.1, tie_gap=0.5),
    torch.float16: Tolerance(aux_rel=0.02, probs_abs=0.02, tie_gap=0.1),
}


def tolerance_for(dtype: torch.dtype) -> Tolerance:
    return TP_TOLERANCES.get(dtype, TP_TOLERANCES[torch.bfloat16])


def reference_tie_gaps(logits: torch.Tensor) -> torch.Tensor:
    """``[B,T]``: the gap between the two largest reference logits behind each answer position (shifted as §1.4)."""
    top2 = logits.float().topk(2, dim=-1).values
    return shift_left(top2[..., 0] - top2[..., 1])


@torch.no_grad()
def reference_and_tie_gaps(
    target: Target, inputs: GenerateInputs, mapping: VocabMapping
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The ``probs`` reference (what :func:`supervision.in_process` returns) and its tie gaps, from one forward.

    :func:`measure` needs both; computing them apart would run the target twice.
    """
    inputs, mapping = inputs.to(target.device), mapping.to(target.device)
    out = target.forward(inputs.input_ids, inputs.attention_mask, packing=inputs.packing)
    assert out.logits is not None  # an unsliced forward
    expected = reference_projection(out.aux_hidden_states, out.logits, inputs.input_ids, inputs.loss_mask, mapping)
    return expected, reference_tie_gaps(out.logits)


@dataclass(frozen=True)
class Deviation:
    """How one served answer differs from the reference, and whether that is within a tolerance."""

    aux_abs: float
    aux_rel: float
    probs_abs: float
    probs_rel: float  # over reference probabilities >= 1e-4
    mask_flips: int
    flips_beyond_ties: int
    positions: int
    exact_rest: bool

    def within(self, tolerance: Tolerance) -> bool:
        return (
            self.exact_rest
            and self.aux_rel <= tolerance.aux_rel
            and self.probs_abs <= tolerance.probs_abs
            and self.flips_beyond_ties == 0
        )

    def verdict(self, tolerance: Tolerance) -> str:
        ok = "yes" if self.within(tolerance) else "NO"
        return (
            f"aux max-dev {self.aux_abs:.2g} ({self.aux_rel:.2g} of max), probs max-dev {self.probs_abs:.2g}, "
            f"{self.mask_flips} mask flip(s) at near-ties ({self.flips_beyond_ties} beyond): within tolerance {ok}"
        )


def measure(batch: Any, expected: Mapping[str, torch.Tensor], tie_gaps: torch.Tensor, tie_gap: float) -> Deviation:
    """Compare a served ``probs`` answer with the single-device reference (:func:`supervision.in_process`)."""
    got = {key: getattr(batch, key).cpu() for key in expected}
    aux, ref_aux = got["aux_hidden_states"].float(), expected["aux_hidden_states"].cpu().float()
    probs, ref_probs = got["target_probs"].float(), expected["target_probs"].cpu().float()
    aux_abs = float((aux - ref_aux).abs().max()) if aux.numel() else 0.0
    scale = float(ref_aux.abs().max()) if ref_aux.numel() else 0.0
    diff = (probs - ref_probs).abs()
    large = ref_probs >= 1e-4
    flips = (got["position_mask"] != expected["position_mask"].cpu()).reshape(tie_gaps.shape)
    exact_rest = all(
        torch.equal(got[key], expected[key].cpu()) and got[key].dtype == expected[key].dtype
        for key in ("input_ids", "loss_mask")
    ) and (aux.shape == ref_aux.shape and probs.shape == ref_probs.shape)
    return Deviation(
        aux_abs=aux_abs,
        aux_rel=aux_abs / scale if scale else aux_abs,
        probs_abs=float(diff.max()) if diff.numel() else 0.0,
        probs_rel=float((diff[large] / ref_probs[large]).max()) if bool(large.any()) else 0.0,
        mask_flips=int(flips.sum()),
        flips_beyond_ties=int((flips & (tie_gaps.cpu() > tie_gap)).sum()),
        positions=int(flips.numel()),
        exact_rest=exact_rest,
    )
