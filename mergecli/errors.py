"""The exception hierarchy: each class carries the exit code the CLI returns for it.

Errors are raised deep inside the library and rendered exactly once, at the CLI edge
(`mergecli.cli._errors`). A `Problem` is one finding with its place in the recipe, so that
validation can report every problem at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    """One finding: where (a recipe path such as `models[1].parameters`), what, and a hint."""

    where: str
    message: str
    hint: str = ""
    code: int = 2

    def render(self) -> str:
        """One human-readable line (two when there is a hint)."""
        head = f"{self.where}: {self.message}" if self.where else self.message
        return f"{head}\n    hint: {self.hint}" if self.hint else head


class MergecliError(Exception):
    """Base class; `exit_code` is what the CLI exits with."""

    exit_code = 1
    title = "error"

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class RecipeError(MergecliError):
    """The recipe is invalid or names models that are missing or incompatible.

    Carries every problem found. The exit code is 2 when any problem is in the recipe
    itself, else the lowest code among the problems (3 not found, 4 incompatible).
    """

    title = "invalid recipe"

    def __init__(self, problems: Sequence[Problem], source: str = "") -> None:
        self.problems = tuple(problems)
        self.source = source
        codes = {p.code for p in self.problems} or {2}
        self.exit_code = 2 if 2 in codes else min(codes)
        self.title = {
            2: "invalid recipe",
            3: "missing or damaged input",
            4: "incompatible models",
        }.get(self.exit_code, "invalid recipe")
        count = len(self.problems)
        super().__init__(f"{count} problem{'s' if count != 1 else ''}")


class UsageError(MergecliError):
    """A command-line argument is invalid."""

    exit_code = 2
    title = "invalid argument"


class NotFoundError(MergecliError):
    """A model, revision or file could not be found or downloaded."""

    exit_code = 3
    title = "not found"


class CorruptFileError(MergecliError):
    """An input file is truncated, malformed or unsafe to load."""

    exit_code = 3
    title = "bad input file"


class IncompatibleModelError(MergecliError):
    """A model mergecli cannot merge correctly (e.g. a quantized checkpoint)."""

    exit_code = 4
    title = "incompatible model"


class NumericsError(MergecliError):
    """NaN/Inf in an input or output, or a value outside the output dtype's range."""

    exit_code = 4
    title = "numerical problem"


class OutputError(MergecliError):
    """The output folder exists, is not writable, or the disk is full."""

    exit_code = 5
    title = "output problem"


class Interrupted(MergecliError):
    """The run was interrupted (SIGINT/SIGTERM)."""

    exit_code = 130
    title = "interrupted"
