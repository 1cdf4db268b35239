"""'Did you mean' hints for misspelt names."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def closest(word: str, choices: Iterable[str]) -> str | None:
    """The closest choice to `word`, or None when nothing is close."""
    matches = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return matches[0] if matches else None


def did_you_mean(word: str, choices: Iterable[str], prefix: str = "") -> str:
    """`"; did you mean `density`?"` or an empty string."""
    match = closest(word, choices)
    return f"{prefix}did you mean `{match}`?" if match else ""
