"""The output folder: refuse to clobber, work in `OUT.partial`, move into place when complete."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from mergecli.errors import OutputError

MARKER = ".mergecli-partial"


def check_output(out: Path, overwrite: bool, input_roots: list[Path]) -> None:
    """Refuse an existing non-empty folder (unless `overwrite`) or a folder inside an input."""
    target = out.resolve()
    for root in input_roots:
        root = root.resolve()
        if target == root or root in target.parents or target in root.parents:
            raise OutputError(
                f"output folder {out} overlaps the input model folder {root}",
                hint="write the merge to a folder outside every input model",
            )
    if out.exists() and not out.is_dir():
        raise OutputError(f"output path {out} exists and is a file", hint="choose another -o path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputError(
            f"output folder {out} already exists and is not empty",
            hint="pass --overwrite to replace it, --resume to continue a run, or choose another -o",
        )


def partial_dir(out: Path) -> Path:
    """The work folder beside `out`."""
    return out.with_name(out.name + ".partial")


def start(out: Path, resume: bool = False) -> Path:
    """Create a fresh work folder beside `out` (removing a stale one of ours), or with
    `resume` keep an existing one of ours."""
    work = partial_dir(out)
    if resume and (work / MARKER).is_file():
        return work
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if work.exists():
            if not (work / MARKER).exists():
                raise OutputError(
                    f"{work} exists and was not made by mergecli",
                    hint="move it away; mergecli works in OUT.partial",
                )
            shutil.rmtree(work)
        work.mkdir()
        (work / MARKER).write_text("mergecli work folder; safe to delete\n")
    except OSError as exc:
        raise OutputError(
            f"cannot create {work}: {exc.strerror}", hint="check permissions of the -o folder"
        ) from None
    return work


def finish(work: Path, out: Path) -> None:
    """Move the complete work folder to `out`, replacing an old `out` only now."""
    (work / MARKER).unlink()
    old = out.with_name(out.name + f".old-{os.getpid()}")
    try:
        if out.exists():
            os.replace(out, old)
        os.replace(work, out)
    except OSError as exc:
        raise OutputError(f"cannot move the output into place: {exc.strerror}") from None
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)


def discard(work: Path) -> None:
    """Remove a work folder of ours after a failure."""
    if work.is_dir() and (work / MARKER).exists():
        shutil.rmtree(work, ignore_errors=True)
