"""Time this checkout's mergecli against another git revision's, interleaved, on the
benchmark recipes of `run.py`:

    python benchmarks/ab.py --against REV [--size 0.5b] [--repeat 3] [--methods ties ...]
                            [--cold]

For each recipe: the I/O floor, then mergecli with REV's code, then with this checkout's,
repeated `--repeat` times in that order (a slow spell of a shared machine hits all three);
prints median walls, the ratio of each to the floor and new/old, and the largest peak RSS.
REV's code runs from a temporary git worktree (PYTHONPATH), on the same family files.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from run import ensure_family, inputs_of, recipes, timed  # noqa: E402


def command(code: Path, recipe: Path, out: Path) -> list[str]:
    """`mergecli run` with the package found under `code` first on the path."""
    boot = (
        f"import sys; sys.path.insert(0, {str(code)!r}); from mergecli.__main__ import main; main()"
    )
    return [
        sys.executable,
        "-c",
        boot,
        "run",
        str(recipe),
        "-o",
        str(out),
        "--overwrite",
        "--quiet",
    ]


def main() -> None:
    """Run every recipe with both codes; print one markdown row per recipe."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--against", required=True)
    parser.add_argument("--size", default="0.5b")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--methods", nargs="*", default=list(recipes(Path())))
    parser.add_argument("--cold", action="store_true", help="empty the page cache before each")
    args = parser.parse_args()
    family = ensure_family(args.size, HERE / "_work" / args.size)
    with tempfile.TemporaryDirectory() as tmp:
        old = Path(tmp) / "old"
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(old), args.against],
            check=True,
            capture_output=True,
        )
        try:
            print(
                f"| recipe | floor s | {args.against[:7]} s | this s | old/floor | new/floor "
                "| new/old | peak RSS old, new |\n|---|---|---|---|---|---|---|---|",
                flush=True,
            )
            for method in args.methods:
                print(row(method, family, old, args.repeat, args.cold), flush=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)])


def row(method: str, family: Path, old: Path, repeat: int, cold: bool = False) -> str:
    """Interleaved timings of one recipe as a markdown row."""
    recipe = family / f"{method}.yaml"
    recipe.write_text(recipes(family)[method])
    floor_file = family / "floor.safetensors"
    runs: dict[str, list[tuple[float, int]]] = {"floor": [], "old": [], "new": []}
    commands = {
        "floor": [
            sys.executable,
            str(HERE / "io_floor.py"),
            str(floor_file),
            *map(str, inputs_of(method, family)),
        ],
        "old": command(old, recipe, family / f"ab-old-{method}"),
        "new": command(ROOT, recipe, family / f"ab-new-{method}"),
    }
    for _ in range(repeat):
        for key, argv in commands.items():
            runs[key].append(timed(argv, cold))
            floor_file.unlink(missing_ok=True)
    for key in ("old", "new"):
        subprocess.run(["rm", "-rf", str(family / f"ab-{key}-{method}")], check=True)
    floor_s, old_s, new_s = (statistics.median(w for w, _ in runs[k]) for k in runs)
    rss = {k: max(r for _, r in runs[k]) / 1e9 for k in ("old", "new")}
    return (
        f"| {method} | {floor_s:.2f} | {old_s:.2f} | {new_s:.2f} | {old_s / floor_s:.2f}x "
        f"| {new_s / floor_s:.2f}x | {new_s / old_s:.3f} | {rss['old']:.2f}, {rss['new']:.2f} GB |"
    )


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
