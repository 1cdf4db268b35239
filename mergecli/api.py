"""The public Python API: load and validate a recipe, plan it, run it to a folder, or
merge state dicts in memory with the same math as the CLI (no file written).

    from mergecli import api

    recipe = api.load_recipe("recipes/ties.yaml")
    plan = api.plan(recipe)                       # every problem raised at once
    result = api.run(recipe, "merged/ties")       # the folder `mergecli run` writes
    merged = api.merge_state_dicts(recipe, {"models/a": sd_a, "models/b": sd_b, ...})

Errors are `mergecli.errors.MergecliError` subclasses; `RecipeError.problems` lists every
problem with its place in the recipe.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mergecli.engine.compute import compute_tensor
from mergecli.engine.device import resolve_device
from mergecli.engine.memory import PIPELINE_JOBS, budget_for
from mergecli.engine.process import share_cores, tune_malloc
from mergecli.engine.run import RunResult, run_plan
from mergecli.errors import Problem, RecipeError, UsageError
from mergecli.io.checkpoint import ModelInfo
from mergecli.io.memory import memory_model
from mergecli.io.reader import TensorReader
from mergecli.plan.build import build_plan
from mergecli.plan.shards import DEFAULT_SHARD_BYTES
from mergecli.plan.types import MergePlan
from mergecli.recipe import load as recipe_load
from mergecli.recipe.refs import referenced_models
from mergecli.recipe.schema import ModelRef, Recipe
from mergecli.units import parse_size

StateDict = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class LoadedRecipe:
    """A checked recipe, its text (copied verbatim into the model card) and the folder
    relative model paths are also looked up in."""

    recipe: Recipe
    text: str
    folder: Path | None = None


def load_recipe(path: str | os.PathLike[str]) -> LoadedRecipe:
    """Read and check the recipe file at `path` (RecipeError lists every problem)."""
    file = Path(path)
    text = recipe_load.read_recipe_text(file)
    return LoadedRecipe(recipe_load.parse_recipe(text, str(file)), text, file.resolve().parent)


def parse_recipe(text: str, folder: str | os.PathLike[str] | None = None) -> LoadedRecipe:
    """Check recipe YAML `text`; relative model paths are also looked up in `folder`."""
    return LoadedRecipe(
        recipe_load.parse_recipe(text), text, None if folder is None else Path(folder)
    )


def plan(
    recipe: LoadedRecipe, *, shard_size: str | int = DEFAULT_SHARD_BYTES, seed: int | None = None
) -> MergePlan:
    """Resolve every model and plan every output tensor (configs and headers only; no
    weight is read). RecipeError lists every problem found."""
    return build_plan(recipe.recipe, recipe.folder, _size(shard_size), seed)


def validate(recipe: LoadedRecipe) -> list[Problem]:
    """Every problem of the recipe and its models (empty when it can be merged)."""
    try:
        plan(recipe)
    except RecipeError as exc:
        return list(exc.problems)
    return []


def run(
    recipe: LoadedRecipe,
    out: str | os.PathLike[str],
    *,
    shard_size: str | int = DEFAULT_SHARD_BYTES,
    seed: int | None = None,
    overwrite: bool = False,
    overwrite_any: bool = False,
    reproducible: bool = False,
    threads: int = PIPELINE_JOBS,
    max_memory: str | int | None = None,
    device: str = "cpu",
) -> RunResult:
    """Merge into the folder `out` exactly as `mergecli run` does (same files, same bytes);
    `overwrite` replaces a mergecli output, `overwrite_any` any folder."""
    merge = plan(recipe, shard_size=shard_size, seed=seed)
    limit = None if max_memory is None else _size(max_memory)
    budget = budget_for(merge, limit, threads)
    where = resolve_device(device)
    tune_malloc()
    share_cores(budget.workers)
    return run_plan(
        merge,
        Path(out),
        recipe.text,
        overwrite or overwrite_any,
        reproducible=reproducible,
        overwrite_any=overwrite_any,
        budget=budget,
        device=where,
    )


def merge_state_dicts(
    recipe: LoadedRecipe | str,
    state_dicts: Mapping[str, StateDict],
    *,
    configs: Mapping[str, Mapping[str, Any]] | None = None,
    seed: int | None = None,
    device: str = "cpu",
) -> dict[str, torch.Tensor]:
    """Merge in memory: `state_dicts` maps each model of the recipe, written as in the
    recipe (`models/a`, `org/name@rev`), to its tensors; `configs` optionally gives their
    config.json contents (layer counts, tying). Returns the output tensors in the output
    dtype, computed with the same plan and math as `mergecli run` (no file is read or
    written)."""
    loaded = parse_recipe(recipe) if isinstance(recipe, str) else recipe
    models = _memory_models(loaded.recipe, state_dicts, configs or {})
    merge = build_plan(loaded.recipe, seed=seed, resolve=lambda ref: models[ref])
    where = resolve_device(device)
    reader = TensorReader(merge.models)
    out = {}
    for tensor in merge.tensors:
        computed = compute_tensor(merge, tensor, reader, device=where).tensor
        out[tensor.name] = computed.clone() if tensor.copy else computed  # never the input
    return out


def _memory_models(
    recipe: Recipe, state_dicts: Mapping[str, StateDict], configs: Mapping[str, Mapping[str, Any]]
) -> dict[ModelRef, ModelInfo]:
    refs = referenced_models(recipe)
    missing = [str(ref) for ref in refs if str(ref) not in state_dicts]
    if missing:
        raise UsageError(
            f"no state dict for {', '.join(missing)}",
            hint=f"give one per model of the recipe, keyed as written there: "
            f"{', '.join(str(r) for r in refs)}",
        )
    return {
        ref: memory_model(str(ref), state_dicts[str(ref)], configs.get(str(ref))) for ref in refs
    }


def _size(value: str | int) -> int:
    if isinstance(value, int):
        return value
    try:
        return parse_size(value)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


__all__ = [
    "LoadedRecipe",
    "MergePlan",
    "RunResult",
    "load_recipe",
    "merge_state_dicts",
    "parse_recipe",
    "plan",
    "run",
    "validate",
]
