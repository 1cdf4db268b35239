"""Steps shared by commands: load a recipe and build its plan."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import yaml

from mergecli.cli._console import STDERR
from mergecli.errors import Problem, RecipeError, UsageError
from mergecli.plan.build import build_plan
from mergecli.plan.inputs import model_problems
from mergecli.plan.types import MergePlan
from mergecli.recipe import yaml_loader
from mergecli.recipe.check import recipe_warnings
from mergecli.recipe.load import load_recipe, read_recipe_text
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


def plan_recipe(
    path: Path, shard_size: str = "5GB", seed: int | None = None, strict: bool = False
) -> MergePlan:
    """Load and check a recipe, resolve its models and plan the merge (no weights read).
    When the recipe itself is invalid, the models it names are checked too, so every
    problem shows at once. Keys that change nothing are warned about on stderr, or
    refused with the errors when `strict`."""
    try:
        recipe = load_recipe(path)
    except RecipeError as exc:
        raise RecipeError([*exc.problems, *_model_problems(path)], exc.source) from None
    warnings = recipe_warnings(recipe)
    if strict and warnings:
        refused = [
            replace(w, message=w.message.replace("; ignored, as", "; refused by --strict;"))
            for w in warnings
        ]
        raise RecipeError([replace(w, hint="remove it") for w in refused], str(path))
    for warning in warnings:
        STDERR.print(f"warning: {path}: {warning.render()}", markup=False, highlight=False)
    try:
        return build_plan(recipe, path.resolve().parent, shard_bytes(shard_size), seed)
    except RecipeError as exc:
        raise RecipeError(exc.problems, str(path)) from None


def _model_problems(path: Path) -> list[Problem]:
    try:
        data = yaml_loader.load(read_recipe_text(path))
    except (RecipeError, yaml.YAMLError):
        return []
    return model_problems(data, path.resolve().parent)
