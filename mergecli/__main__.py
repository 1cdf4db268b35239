"""The `mergecli` entry point (console script and `python -m mergecli`).

Signal handlers are installed before the heavy imports (torch, transformers: about a
second and a half), so Ctrl-C or SIGTERM while starting ends quietly with exit 130."""

from __future__ import annotations

import os
import signal
import sys

_RECEIVED: list[int] = []


def _terminate(signum: int, frame: object) -> None:
    # recorded too: an interrupted import can swallow the KeyboardInterrupt or turn it into
    # another error (numpy's "cannot load module more than once"); the start ends all the same
    _RECEIVED.append(signum)
    raise KeyboardInterrupt


def _quit() -> None:
    sys.stderr.write("interrupted while starting; nothing was written\n")
    sys.stderr.flush()
    os._exit(130)


def main() -> None:
    """Install the signal handlers, then load and run the CLI."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(signum) is not signal.SIG_IGN:  # `nohup`, background jobs
            signal.signal(signum, _terminate)
    try:
        from mergecli.cli import main as cli_main
    except BaseException:
        if _RECEIVED:  # whatever the interrupted import turned it into
            _quit()
        raise
    if _RECEIVED:
        _quit()
    cli_main()


if __name__ == "__main__":
    main()
