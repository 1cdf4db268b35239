"""The output folder: refuse to clobber, work in `OUT.partial` owned by one live process,
move into place when complete.

`OUT.partial` holds a marker file that its run keeps locked (`flock`) until the end: a
second run into the same OUT finds the lock taken and is refused, naming the process; a
marker nobody holds is a stale folder of a run that died, removed (or resumed). `OUT`
itself is replaced only when it is empty or a mergecli output (it has a manifest), unless
the user says `--overwrite-any`.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from mergecli.errors import OutputError

MARKER = ".mergecli-partial"
MANIFEST = "mergecli_manifest.json"
SHOWN = 8  # names listed when refusing to replace a folder


@dataclass
class WorkFolder:
    """`OUT.partial`, owned by this process while `lock` (the locked marker) is open."""

    path: Path
    lock: int

    def release(self) -> None:
        """Give up ownership (the lock goes with the descriptor)."""
        if self.lock >= 0:
            os.close(self.lock)
            self.lock = -1


def normalized(out: Path) -> Path:
    """`out` made absolute with `.` and `..` removed (`-o .`, `-o sub/..` name real folders)."""
    return Path(os.path.abspath(out))


def check_output(
    out: Path, overwrite: bool, input_roots: list[Path], overwrite_any: bool = False
) -> None:
    """Refuse an output that is a file or a link, lies inside an input, or is a non-empty
    folder that may not be replaced (see `replaceable`)."""
    target = normalized(out).resolve()
    for root in input_roots:
        root = root.resolve()
        if target == root or root in target.parents or target in root.parents:
            raise OutputError(
                f"output folder {out} overlaps the input model folder {root}",
                hint="write the merge to a folder outside every input model",
            )
    if out.is_symlink():
        raise OutputError(
            f"output path {out} is a symbolic link", hint="give the real folder it points to"
        )
    if out.exists() and not out.is_dir():
        raise OutputError(f"output path {out} exists and is a file", hint="choose another -o path")
    replaceable(out, overwrite, overwrite_any)


def replaceable(out: Path, overwrite: bool, overwrite_any: bool) -> None:
    """Refuse to replace `out` unless it is missing or empty, or `overwrite` and it is a
    mergecli output (or `overwrite_any`)."""
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not overwrite:
        raise OutputError(
            f"output folder {out} already exists and is not empty",
            hint="pass --overwrite to replace it, --resume to continue a run, or choose another -o",
        )
    if overwrite_any or (out / MANIFEST).is_file():
        return
    names = sorted(p.name for p in out.iterdir())
    listed = ", ".join(names[:SHOWN]) + (
        f" and {len(names) - SHOWN} more" if len(names) > SHOWN else ""
    )
    raise OutputError(
        f"output folder {out} is not a mergecli output (no {MANIFEST}); it holds: {listed}",
        hint="choose another -o, or pass --overwrite-any to delete what it holds",
    )


def partial_dir(out: Path) -> Path:
    """The work folder beside `out`."""
    out = normalized(out)
    return out.with_name(out.name + ".partial")


def start(out: Path, resume: bool = False) -> WorkFolder:
    """Own a fresh work folder beside `out` (removing a stale one of ours), or with
    `resume` keep a stale one of ours; refuse one that a live run owns."""
    work = partial_dir(out)
    try:
        work.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                work.mkdir()
            except FileExistsError:
                owned = _take_stale(work)
                if resume:
                    return owned
                shutil.rmtree(work)
                owned.release()
                continue
            return _own(work)
    except OSError as exc:
        raise OutputError(
            f"cannot create {work}: {exc.strerror}", hint="check permissions of the -o folder"
        ) from None
    raise OutputError(f"{work} keeps being recreated by another process", hint="stop the other run")


def _own(work: Path) -> WorkFolder:
    fd = os.open(work / MARKER, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    _claim(fd)
    return WorkFolder(work, fd)


def _claim(fd: int) -> None:
    """Write this process into the (locked) marker, for a second run's refusal message."""
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"mergecli work folder of process {os.getpid()}; safe to delete\n".encode(), 0)


def _take_stale(work: Path) -> WorkFolder:
    """Lock the marker of an existing work folder; refuse a folder that is not ours or
    whose run is alive."""
    marker = work / MARKER
    if not marker.is_file():
        raise OutputError(
            f"{work} exists and was not made by mergecli",
            hint="move it away; mergecli works in OUT.partial",
        )
    fd = os.open(marker, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = marker.read_text(encoding="utf-8", errors="replace").strip()
        os.close(fd)
        raise OutputError(
            f"another run is writing this output: {work} is in use ({owner[:120]})",
            hint="wait for it to finish or stop it; two runs never share one output",
        ) from None
    _claim(fd)
    return WorkFolder(work, fd)


def finish(
    work: WorkFolder, out: Path, overwrite: bool = False, overwrite_any: bool = False
) -> None:
    """Move the complete work folder to `out`, replacing an old `out` only now (and only
    when it may still be replaced: it can have changed during the run)."""
    out = normalized(out)
    replaceable(out, overwrite, overwrite_any)
    old = out.with_name(out.name + f".old-{os.getpid()}")
    try:
        (work.path / MARKER).unlink()
        if out.exists():
            os.replace(out, old)
        os.replace(work.path, out)
    except OSError as exc:
        raise OutputError(f"cannot move the output into place: {exc.strerror}") from None
    finally:
        work.release()
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)


def discard(work: WorkFolder) -> None:
    """Remove our work folder after a failure (again if a worker still finishing a job
    wrote into it meanwhile)."""
    for _ in range(3):
        if not (work.path.is_dir() and (work.path / MARKER).exists()):
            break
        shutil.rmtree(work.path, ignore_errors=True)
    work.release()
