"""The recipe's own types when NeMo AutoModel is installed, equivalent local ones otherwise.

The EAGLE-3 recipe checks ``isinstance(backend, Eagle3TargetBackend)`` and reads
``Eagle3TargetBatch`` fields, so when ``nemo_automodel`` is importable we must hand it its
own classes. Without it (a lean trainer image, or our CI) the local versions below have the
same fields, the same "exactly one supervision source" validation and the same defaults.
"""

from __future__ import annotations

import importlib.util
import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Eagle3TargetBackend", "Eagle3TargetBatch", "USING_NEMO_AUTOMODEL"]


@dataclass
class _LocalEagle3TargetBatch:
    """Supervision for one batch: ``logits`` or (``target_probs`` and ``position_mask``)."""

    aux_hidden_states: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor
    logits: torch.Tensor | None = None
    target_probs: torch.Tensor | None = None
    position_mask: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None
    seq_lens: torch.Tensor | None = None
    doc_remaining: torch.Tensor | None = None

    def __post_init__(self) -> None:
        has_logits = self.logits is not None
        has_probs = self.target_probs is not None and self.position_mask is not None
        if has_logits == has_probs:
            raise ValueError(
                "Eagle3TargetBatch needs exactly one supervision source: `logits`, "
                "or both `target_probs` and `position_mask`"
            )


class _LocalEagle3TargetBackend(ABC):
    """The backend contract of upstream-protocol.md §5."""

    @abstractmethod
    def generate_batch(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor) -> Any: ...

    @abstractmethod
    def get_input_embeddings(self) -> torch.nn.Module: ...

    def set_vocab_mapping(self, selected_token_ids: torch.Tensor, selected_token_mask: torch.Tensor) -> None:
        """Co-located backends ignore the mapping; remote ones forward it."""

    @property
    def supports_async(self) -> bool:
        return False

    def generate_batch_async(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor
    ) -> Any:
        raise NotImplementedError(f"{type(self).__name__} does not support async prefetch")

    def close(self) -> None:
        """Release connections."""


def _upstream_types() -> tuple[type, type] | None:
    """Upstream's classes, or None when NeMo AutoModel is absent or fails to import.

    Any exception counts, not only ImportError: a half-installed AutoModel can fail on a
    missing optional dependency's side effects (a CUDA-only extension, a version check),
    and a broken optional integration must not stop the client from working.
    """
    if importlib.util.find_spec("nemo_automodel") is None:
        return None
    try:
        from nemo_automodel.components.speculative.eagle.backend import Eagle3TargetBackend as backend
        from nemo_automodel.components.speculative.eagle.target import Eagle3TargetBatch as batch
    except Exception as exc:  # noqa: BLE001 - see the docstring
        logging.getLogger(__name__).warning(
            "nemo_automodel is installed but its EAGLE-3 types do not import (%s: %s); "
            "using the client's own equivalent types",
            type(exc).__name__,
            exc,
        )
        return None
    return backend, batch


_UPSTREAM = _upstream_types()
if _UPSTREAM is None:
    Eagle3TargetBackend: type = _LocalEagle3TargetBackend
    Eagle3TargetBatch: type = _LocalEagle3TargetBatch
    USING_NEMO_AUTOMODEL = False
else:
    Eagle3TargetBackend, Eagle3TargetBatch = _UPSTREAM
    USING_NEMO_AUTOMODEL = True
