"""The `mergecli` Typer application."""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Annotated

import typer

from mergecli import __version__
from mergecli.cli import recipes_cmd
from mergecli.cli._errors import State, guard
from mergecli.cli.extract_cmd import extract_lora
from mergecli.cli.methods_cmd import methods_cmd
from mergecli.cli.plan_cmd import plan
from mergecli.cli.run import run
from mergecli.cli.validate import validate

app = typer.Typer(
    name="mergecli",
    help="Merge neural-network checkpoints from a declarative YAML recipe.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _version(value: bool) -> None:
    if value:
        print(f"mergecli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Show tracebacks for errors.")
    ] = False,
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    State.verbose = verbose


app.command("run")(run)
app.command("validate")(validate)
app.command("plan")(plan)
app.command("methods")(methods_cmd)
app.command("extract-lora")(extract_lora)
app.add_typer(recipes_cmd.app, name="recipes")
guard(app)


def main() -> None:
    """Console-script entry point. The process ends without the interpreter's teardown
    (torch's takes about 0.3 s and more after a big merge): outputs are complete and closed
    by then, and the streams are flushed here."""
    try:
        app()
        code: int = 0
    except SystemExit as done:
        code = _exit_code(done.code)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe (`... | head`)
            stream.flush()
    os._exit(code)


def _exit_code(value: object) -> int:
    if value is None:
        return 0
    if isinstance(value, int):
        return value
    print(value, file=sys.stderr)
    return 1
