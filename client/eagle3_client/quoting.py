"""A client's value in an error message: quoted whole only when it is short.

Why: an error names the value it refuses, but the value is as large as the client made it; a
megabyte list echoed whole turns one refused request into a megabyte answer and log line.
"""

from __future__ import annotations

from typing import Any

__all__ = ["MAX_QUOTED_CHARS", "quote"]

# The longest prefix of a value's repr an error message quotes.
MAX_QUOTED_CHARS = 200


def quote(value: Any) -> str:
    """``repr(value)``, or its first :data:`MAX_QUOTED_CHARS` characters, ``...`` and its whole length."""
    text = repr(value)
    if len(text) <= MAX_QUOTED_CHARS:
        return text
    return f"{text[:MAX_QUOTED_CHARS]}... ({len(text)} characters)"
