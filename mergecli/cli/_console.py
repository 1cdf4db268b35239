"""Consoles: data on stdout, progress, warnings and errors on stderr."""

from __future__ import annotations

import sys

from rich.console import Console

STDERR = Console(stderr=True, highlight=False, soft_wrap=True)
PIPE_WIDTH = 250


def stdout_console() -> Console:
    """A stdout console; wide when piped so tables are never cut."""
    return Console(highlight=False, width=None if sys.stdout.isatty() else PIPE_WIDTH)
