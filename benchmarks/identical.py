"""Prove that a change of mergecli's code changes no output byte.

    python benchmarks/identical.py --against REV [--size tiny] [--size 0.5b]

Runs every bundled recipe (`recipes/*.yaml`) and every benchmark recipe of `run.py` (on
the benchmark families of the given sizes) twice: with the code of this checkout and with
the code of git revision REV (a temporary worktree). Both runs read the same recipe files
and the same models, so the manifests' paths and mtimes agree; only the code differs.
Prints one row per recipe (files compared, files that differ) and exits 1 when any
output file differs.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from run import ensure_family  # noqa: E402
from run import recipes as benchmark_recipes  # noqa: E402


def digests(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, by relative path."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def merge(code: Path, recipe: Path, out: Path) -> dict[str, str]:
    """Run `recipe` with the mergecli package found under `code`; the output's digests."""
    env = {**os.environ, "PYTHONPATH": str(code), "HF_HUB_OFFLINE": "1"}
    command = [
        sys.executable,
        "-c",
        "import sys, mergecli.cli as c; assert c.__file__.startswith(sys.argv[1]); "
        "sys.argv = ['mergecli', *sys.argv[2:]]; c.main()",
        str(code),
        "run",
        str(recipe),
        "-o",
        str(out),
        "--reproducible",
        "--quiet",
    ]
    done = subprocess.run(command, env=env, cwd=recipe.parent, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{recipe.name} failed with the code in {code}:\n{done.stderr}")
    return digests(out)


def recipe_files(work: Path, sizes: list[str]) -> list[Path]:
    """The bundled recipes, then the benchmark recipes written for each family size."""
    found = sorted((ROOT / "recipes").glob("*.yaml"))
    for size in sizes:
        family = ensure_family(size, HERE / "_work" / size)
        for method, text in benchmark_recipes(family).items():
            path = work / f"{size}-{method}.yaml"
            path.write_text(text)
            found.append(path)
    return found


def main() -> None:
    """Compare every recipe's outputs under both codes; exit 1 on any difference."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--against", required=True, help="git revision to compare with")
    parser.add_argument("--size", action="append", default=[], help="benchmark family sizes")
    args = parser.parse_args()
    differ = 0
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        old = work / "old-code"
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(old), args.against],
            check=True,
            capture_output=True,
        )
        try:
            print("| recipe | files | differ |\n|---|---|---|")
            for recipe in recipe_files(work, args.size):
                label = recipe.stem
                new = merge(ROOT, recipe, work / f"new-{label}")
                before = merge(old, recipe, work / f"old-{label}")
                bad = sorted(n for n in new.keys() | before.keys() if new.get(n) != before.get(n))
                differ += len(bad)
                print(f"| {label} | {len(new)} | {', '.join(bad) or 0} |", flush=True)
                for folder in (work / f"new-{label}", work / f"old-{label}"):
                    subprocess.run(["rm", "-rf", str(folder)], check=True)
        finally:
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)], check=True
            )
    print(f"\n{'identical' if differ == 0 else f'{differ} files differ'} (against {args.against})")
    sys.exit(1 if differ else 0)


if __name__ == "__main__":
    main()
