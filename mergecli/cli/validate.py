"""`mergecli validate`: every problem of each recipe at once, reading only headers."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mergecli.cli._common import plan_recipe
from mergecli.cli._console import STDERR
from mergecli.cli._errors import exit_code_of, render_error
from mergecli.cli._options import StrictOpt
from mergecli.io.checkpoint import ModelInfo


def fold_summary(model: ModelInfo) -> str | None:
    """What an adapter does to its base, for one line of `validate` (None: no adapter)."""
    folds = [t.fold for t in model.tensors.values() if t.fold is not None]
    if not folds:
        return None
    ranks = sorted({f.adapter.tensors[f.a].shape[0] for f in folds if f.a is not None})
    dora = sum(1 for f in folds if f.magnitude is not None)
    replaced = sum(1 for f in folds if f.replace is not None)
    text = f"LoRA folded into {len(folds) - replaced} tensors"
    if ranks:
        text += f" (rank {', '.join(map(str, ranks))}{f'; {dora} DoRA' if dora else ''})"
    return text + (f", {replaced} replaced (modules_to_save)" if replaced else "")


def validate(
    recipes: Annotated[list[Path], typer.Argument(help="Recipe YAML files.", show_default=False)],
    strict: StrictOpt = False,
) -> None:
    """Check recipes: schema, methods, parameters, models, shapes and layer ranges.

    Reads configs, indexes and safetensors headers only; exits 0 when every recipe is
    valid, else the exit code of the failures (2 for a recipe problem, 3 for a missing or
    damaged model file, 4 for incompatible models; with several recipes, 2 when any has a
    recipe problem, else the lowest).

    Example:

      mergecli validate recipes/*.yaml
    """
    failed: list[int] = []
    for path in recipes:
        try:
            plan = plan_recipe(path, strict=strict)
        except Exception as exc:
            failed.append(render_error(exc))
            continue
        print(
            f"ok: {path} ({plan.method.name}, {len(plan.models)} models, {len(plan.tensors)} tensors)"
        )
        for model in plan.models:
            summary = fold_summary(model)
            if summary:
                print(f"  {model.label}: {summary}")
    if failed:
        count = len(recipes)
        STDERR.print(f"{len(failed)} of {count} recipe{'s' if count != 1 else ''} invalid")
        raise typer.Exit(exit_code_of(failed))
