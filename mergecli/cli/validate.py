"""`mergecli validate`: every problem of each recipe at once, reading only headers."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mergecli.cli._common import plan_recipe
from mergecli.cli._console import STDERR
from mergecli.cli._errors import render_error
from mergecli.errors import MergecliError


def validate(
    recipes: Annotated[list[Path], typer.Argument(help="Recipe YAML files.", show_default=False)],
) -> None:
    """Check recipes: schema, methods, parameters, models, shapes and layer ranges.

    Reads configs, indexes and safetensors headers only; exits 0 when every recipe is
    valid, 2 otherwise.

    Example:

      mergecli validate recipes/*.yaml
    """
    failed = 0
    for path in recipes:
        try:
            plan = plan_recipe(path)
        except MergecliError as exc:
            render_error(exc)
            failed += 1
            continue
        print(
            f"ok: {path} ({plan.method.name}, {len(plan.models)} models, {len(plan.tensors)} tensors)"
        )
    if failed:
        STDERR.print(f"{failed} of {len(recipes)} recipe{'s' if len(recipes) != 1 else ''} invalid")
        raise typer.Exit(2)
