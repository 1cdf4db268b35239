"""Render every error once, at the CLI edge: one table from exception type to output."""

from __future__ import annotations

import functools
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

import typer

from mergecli.cli._console import STDERR
from mergecli.errors import Interrupted, MergecliError, RecipeError

F = TypeVar("F", bound=Callable[..., Any])
REPORT_HINT = "this is a bug in mergecli; please report it with the command, the recipe and `mergecli -v ...` output"


class State:
    """Global CLI flags."""

    verbose = False


def render_error(exc: BaseException) -> int:
    """Print `exc` to stderr and return the exit code it maps to."""
    if isinstance(exc, KeyboardInterrupt):
        exc = Interrupted("interrupted; no output folder was left behind")
    if isinstance(exc, RecipeError):
        where = f" in {exc.source}" if exc.source else ""
        STDERR.print(f"[bold red]error:[/] {exc.title}{where}: {exc.message}", markup=True)
        for problem in exc.problems:
            STDERR.print("  - " + problem.render().replace("\n", "\n  "), markup=False)
        return exc.exit_code
    if isinstance(exc, MergecliError):
        STDERR.print(f"[bold red]error:[/] {exc.title}: ", markup=True, end="")
        STDERR.print(exc.message, markup=False)
        if exc.hint:
            STDERR.print(f"  hint: {exc.hint}", markup=False)
        return exc.exit_code
    STDERR.print("[bold red]internal error:[/] ", markup=True, end="")
    STDERR.print(f"{type(exc).__name__}: {exc}", markup=False)
    STDERR.print(f"  hint: {REPORT_HINT}", markup=False)
    if State.verbose:
        STDERR.print("".join(traceback.format_exception(exc)), markup=False)
    return 1


def handle_errors(fn: F) -> F:
    """Decorator for commands: turn any exception into a message and an exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except (Exception, KeyboardInterrupt) as exc:
            if State.verbose and isinstance(exc, MergecliError):
                STDERR.print("".join(traceback.format_exception(exc)), markup=False)
            raise typer.Exit(render_error(exc)) from None

    return wrapper  # type: ignore[return-value]
