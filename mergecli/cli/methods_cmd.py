"""`mergecli methods`: the method registry as a table, or one method in full."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from mergecli import methods
from mergecli.cli._console import stdout_console
from mergecli.cli._options import JsonOpt
from mergecli.errors import UsageError
from mergecli.methods.spec import MethodSpec
from mergecli.recipe.suggest import did_you_mean


def method_to_dict(spec: MethodSpec) -> dict[str, Any]:
    """A method's spec as JSON-ready data."""
    return {
        "name": spec.name,
        "summary": spec.summary,
        "needs_base": spec.needs_base,
        "min_models": spec.min_models,
        "max_models": spec.max_models,
        "random": spec.random,
        "data": spec.data,
        "paper": spec.paper,
        "parameters": [
            {
                "name": p.name,
                "type": p.type,
                "scope": "per model" if p.scope == "model" else "method-wide",
                "required": p.required,
                "default": p.default,
                "allowed": p.allowed(),
                "description": p.description,
            }
            for p in spec.params
        ],
    }


def _param_text(spec: MethodSpec) -> str:
    parts = []
    for p in spec.params:
        default = "required" if p.required else f"{json.dumps(p.default)}"
        parts.append(f"{p.name} ({default})")
    return ", ".join(parts) or "-"


def methods_cmd(
    name: Annotated[
        str | None, typer.Argument(help="Show one method in full.", show_default=False)
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """List merge methods with parameters, defaults, base needs, data needs and papers.

    Examples:

      mergecli methods

      mergecli methods linear --json
    """
    console = stdout_console()
    if name is not None:
        spec = methods.get(name)
        if spec is None:
            raise UsageError(
                f"unknown method `{name}`" + did_you_mean(name, methods.names(), "; "),
                hint="available: " + ", ".join(methods.names()),
            )
        _show_one(console, spec, as_json)
        return
    specs = [methods.REGISTRY[n] for n in methods.names()]
    if as_json:
        print(json.dumps([method_to_dict(s) for s in specs], indent=2))
        return
    table = Table(
        "method", "parameters (default)", "base", "inputs", "data", "paper", title="merge methods"
    )
    for spec in specs:
        inputs = (
            f"{spec.min_models}+"
            if spec.max_models is None
            else f"{spec.min_models}-{spec.max_models}"
        )
        table.add_row(
            spec.name,
            _param_text(spec),
            "needed" if spec.needs_base else "-",
            inputs,
            spec.data,
            spec.paper,
        )
    console.print(table)


def _show_one(console: Console, spec: MethodSpec, as_json: bool) -> None:
    data = method_to_dict(spec)
    if as_json:
        print(json.dumps(data, indent=2))
        return
    console.print(f"[bold]{spec.name}[/]: {spec.summary}")
    console.print(f"paper: {spec.paper or '-'}")
    console.print(
        f"base model: {'needed' if spec.needs_base else 'not needed'}; data: {spec.data}; random: {'yes' if spec.random else 'no'}"
    )
    table = Table("parameter", "scope", "type", "default", "allowed", "description")
    for p in data["parameters"]:
        default = "required" if p["required"] else json.dumps(p["default"])
        table.add_row(p["name"], p["scope"], p["type"], default, p["allowed"], p["description"])
    console.print(table)
