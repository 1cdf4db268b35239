"""Steps shared by commands: load a recipe and build its plan."""

from __future__ import annotations

from pathlib import Path

from mergecli.errors import RecipeError, UsageError
from mergecli.plan.build import build_plan
from mergecli.plan.types import MergePlan
from mergecli.recipe.load import load_recipe
from mergecli.units import parse_size


def size_option(text: str, option: str) -> int:
    """Parse a size option, as a usage error when it is malformed."""
    try:
        return parse_size(text)
    except ValueError as exc:
        raise UsageError(f"{option}: {exc}") from None


def shard_bytes(text: str) -> int:
    """Parse `--shard-size`, as a usage error when it is malformed."""
    return size_option(text, "--shard-size")


def plan_recipe(path: Path, shard_size: str = "5GB", seed: int | None = None) -> MergePlan:
    """Load and check a recipe, resolve its models and plan the merge (no weights read)."""
    recipe = load_recipe(path)
    try:
        return build_plan(recipe, path.resolve().parent, shard_bytes(shard_size), seed)
    except RecipeError as exc:
        raise RecipeError(exc.problems, str(path)) from None
