"""The custom metrics Locust does not keep: supervision bytes and tokens per ``/generate``.

Each process counts what its own users received. In distributed mode a worker ships its
counts to the master with every stats report and starts again from zero, and the master
adds them up, so the master's counters are the run's totals (the same way Locust's own
stats travel).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

__all__ = ["SupervisionCounters"]


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


@dataclass
class SupervisionCounters:
    """Running totals over valid ``/generate`` answers (plus a count of invalid ones)."""

    responses: int = 0
    response_bytes: int = 0  # whole bodies, wire headers included
    payload_bytes: int = 0  # tensor data only
    tokens: int = 0  # batch x padded length: what the server computed
    real_tokens: int = 0  # attention-mask ones: what the trainer wanted
    invalid: int = 0  # answers that decoded wrongly or failed validation

    def record(self, *, response_bytes: int, payload_bytes: int, tokens: int, real_tokens: int) -> None:
        self.responses += 1
        self.response_bytes += response_bytes
        self.payload_bytes += payload_bytes
        self.tokens += tokens
        self.real_tokens += real_tokens

    def merge(self, data: dict[str, Any]) -> None:
        """Add counts received from another process (unknown keys are ignored)."""
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + int(data.get(f.name, 0)))

    def take(self) -> dict[str, int]:
        """The counts so far, then zero (what a worker sends with each report)."""
        data = asdict(self)
        self.reset()
        return data

    def reset(self) -> None:
        for f in fields(self):
            setattr(self, f.name, 0)

    def snapshot(self) -> dict[str, int]:
        return asdict(self)

    def summary(self, elapsed_s: float) -> dict[str, float | int | None]:
        """Totals plus the derived rates; rates are None when there is nothing to divide by."""
        return {
            **asdict(self),
            "elapsed_s": round(elapsed_s, 3),
            "response_bytes_mean": _ratio(self.response_bytes, self.responses),
            "supervision_bytes_per_token": _ratio(self.payload_bytes, self.tokens),
            "response_bytes_per_token": _ratio(self.response_bytes, self.tokens),
            "tokens_per_second": _ratio(self.tokens, elapsed_s),
            "real_tokens_per_second": _ratio(self.real_tokens, elapsed_s),
            "padding_fraction": _ratio(self.tokens - self.real_tokens, self.tokens),
        }
