"""The `mergecli` entry point (console script and `python -m mergecli`).

Signal handlers are installed before the heavy imports (torch, transformers: about a
second and a half), so Ctrl-C or SIGTERM while starting ends quietly with exit 130."""

from __future__ import annotations

import os
import signal
import sys


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> None:
    """Install the signal handlers, then load and run the CLI."""
    signal.signal(signal.SIGTERM, _terminate)
    try:
        from mergecli.cli import main as cli_main
    except KeyboardInterrupt:
        sys.stderr.write("interrupted while starting; nothing was written\n")
        sys.stderr.flush()
        os._exit(130)
    cli_main()


if __name__ == "__main__":
    main()
