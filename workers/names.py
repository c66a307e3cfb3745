"""A suggestion for a mistyped name (a judge, prompt, strategy or method), for one-line errors."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """" Did you mean 'x'?" for the closest known name, or "" when none is close."""
    close = difflib.get_close_matches(name, list(known), n=1)
    return f" Did you mean {close[0]!r}?" if close else ""
