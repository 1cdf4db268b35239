"""The manifest: tool version, seed, inputs with commits, sha256 of every output file."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from mergecli import __version__
from mergecli.output import folder as output
from mergecli.output import resume as progress_file
from mergecli.output.side_files import write_json
from mergecli.plan.types import MergePlan


def hash_files(work: Path, known: dict[str, str]) -> dict[str, str]:
    """sha256 of every output file; shards hashed when they were finished are not re-read."""
    out = {}
    for path in sorted(work.rglob("*")):
        name = path.relative_to(work).as_posix()
        if path.is_file() and path.name != output.MARKER:
            out[name] = known.get(name) or progress_file.sha256_file(path)
    return out


def write_manifest(
    plan: MergePlan,
    work: Path,
    files: dict[str, str],
    seconds: float | None,
    inputs: list[dict[str, Any]],
) -> None:
    """Write `mergecli_manifest.json`: tool, method, seed, recipe hash, the inputs as
    `resume.input_files` describes them, every output file's sha256, the wall time."""
    recipe_text = (work / "mergecli_recipe.yaml").read_bytes()
    manifest = {
        "tool": "mergecli",
        "version": __version__,
        "method": plan.method.name,
        "seed": plan.seed,
        "recipe_sha256": hashlib.sha256(recipe_text).hexdigest(),
        "inputs": inputs,
        "outputs": files,
    }
    if seconds is not None:
        manifest["wall_seconds"] = round(seconds, 3)
    write_json(work / "mergecli_manifest.json", manifest)
