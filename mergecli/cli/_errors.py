"""Render every error once, at the CLI edge: one table from exception type to output."""

from __future__ import annotations

import functools
import re
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


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """`text` with control characters shown as escapes (`\\x1b`): names from recipes and
    files must not drive the terminal."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def render_error(exc: BaseException) -> int:
    """Print `exc` to stderr and return the exit code it maps to."""
    if isinstance(exc, KeyboardInterrupt):
        exc = Interrupted("interrupted; no output folder was left behind")
    if isinstance(exc, RecipeError):
        where = f" in {exc.source}" if exc.source else ""
        STDERR.print("[bold red]error:[/] ", markup=True, end="")
        STDERR.print(printable(f"{exc.title}{where}: {exc.message}"), markup=False)
        for problem in exc.problems:
            text = "  - " + problem.render().replace("\n", "\n  ")
            STDERR.print(printable(text), markup=False)
        return exc.exit_code
    if isinstance(exc, MergecliError):
        STDERR.print(f"[bold red]error:[/] {exc.title}: ", markup=True, end="")
        STDERR.print(printable(exc.message), markup=False)
        if exc.hint:
            STDERR.print(printable(f"  hint: {exc.hint}"), markup=False)
        return exc.exit_code
    STDERR.print("[bold red]internal error:[/] ", markup=True, end="")
    STDERR.print(printable(f"{type(exc).__name__}: {exc}"), markup=False)
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

    wrapper.guarded = True  # type: ignore[attr-defined]
    return wrapper  # type: ignore[return-value]


def guard(app: typer.Typer) -> None:
    """Wrap every command of `app` and of its sub-apps in `handle_errors`: the one error
    boundary, so no command can forget it."""
    for info in app.registered_commands:
        if info.callback is not None and not getattr(info.callback, "guarded", False):
            info.callback = handle_errors(info.callback)
    for group in app.registered_groups:
        if group.typer_instance is not None:
            guard(group.typer_instance)


def exit_code_of(codes: list[int]) -> int:
    """One exit code for several failures: 2 when any is a recipe or usage error, else
    the lowest (as for the problems of one recipe)."""
    return 2 if 2 in codes else min(codes)
