"""`mergecli recipes list|show|cp`: the bundled example recipes."""

from __future__ import annotations

import os
import re
from importlib import resources
from pathlib import Path
from typing import Annotated

import typer
import yaml
from rich.table import Table

from mergecli.cli._console import stdout_console
from mergecli.errors import NotFoundError, OutputError
from mergecli.recipe.suggest import did_you_mean

app = typer.Typer(
    help="Bundled example recipes (they run offline on the bundled tiny models).",
    no_args_is_help=True,
)


def bundled_dir() -> Path:
    """The folder of bundled recipes: the `mergecli.bundled` package shipped in the wheel
    (the checkout's `recipes/` in an editable install); MERGECLI_RECIPES overrides."""
    override = os.environ.get("MERGECLI_RECIPES")
    folder = Path(override) if override else Path(str(resources.files("mergecli.bundled")))
    if not folder.is_dir():
        raise NotFoundError(
            f"bundled recipes folder {folder} not found",
            hint="reinstall mergecli (pip install mergecli) or set MERGECLI_RECIPES",
        )
    return folder


def _recipes() -> dict[str, Path]:
    return {p.stem: p for p in sorted(bundled_dir().glob("*.yaml"))}


def _find(name: str) -> Path:
    found = _recipes()
    key = name.removesuffix(".yaml")
    if key not in found:
        raise NotFoundError(
            f"no bundled recipe `{name}`" + did_you_mean(key, found, "; "),
            hint="`mergecli recipes list` shows them",
        )
    return found[key]


def _title(path: Path) -> str:
    first = path.read_text(encoding="utf-8").splitlines()[:1]
    return first[0].lstrip("# ").strip() if first and first[0].startswith("#") else ""


@app.command("list")
def list_recipes() -> None:
    """List bundled recipes.

    Example:

      mergecli recipes list
    """
    table = Table("name", "method", "description", title="bundled recipes")
    for name, path in _recipes().items():
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        table.add_row(name, str(data.get("merge_method", "?")), _title(path))
    stdout_console().print(table)


@app.command("show")
def show(name: Annotated[str, typer.Argument(help="Recipe name (see `recipes list`).")]) -> None:
    """Print a bundled recipe.

    Example:

      mergecli recipes show quickstart
    """
    print(_find(name).read_text(encoding="utf-8"), end="")


def localize(text: str, folder: Path) -> str:
    """Rewrite model paths relative to `folder` as absolute paths, so the copy runs anywhere."""

    def absolute(match: re.Match[str]) -> str:
        value = match.group(2)
        candidate = folder / value
        if not value.startswith("/") and candidate.is_dir():
            return f"{match.group(1)}{candidate.resolve()}"
        return match.group(0)

    return re.sub(r"((?:model|base_model|tokenizer_source):\s*)([^\s#{}\[\],]+)", absolute, text)


@app.command("cp")
def cp(
    name: Annotated[str, typer.Argument(help="Recipe name (see `recipes list`).")],
    dest: Annotated[Path, typer.Argument(help="File or folder to copy it to.")],
) -> None:
    """Copy a bundled recipe to edit it; its model paths become absolute.

    Example:

      mergecli recipes cp quickstart my-merge.yaml
    """
    source = _find(name)
    target = dest / source.name if dest.is_dir() else dest
    if target.exists():
        raise OutputError(
            f"{target} already exists", hint="choose another destination or remove it"
        )
    target.write_text(localize(source.read_text(encoding="utf-8"), source.parent), encoding="utf-8")
    print(target)
