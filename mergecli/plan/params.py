"""Resolve a parameter for one tensor: model or slice source, slice, top level, default."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mergecli.errors import Problem
from mergecli.recipe.settings import Parameters, evaluate


def lookup(name: str, tensor: str, t: float, blocks: Sequence[Parameters | None]) -> Any:
    for block in blocks:
        if block is not None and name in block:
            value = evaluate(block[name], tensor, t)
            if value is not None:
                return value
    return None


def unresolved(param: str, tensor: str, where: str) -> Problem:
    return Problem(
        where,
        f"parameter `{param}` has no value for tensor `{tensor}` (no filter condition matched)",
        "add a catch-all condition without `filter` (e.g. `- value: 1.0`)",
    )
