"""Shard-level progress in `OUT.partial`, so `--resume` can reuse finished shards.

After each shard is complete it is flushed, hashed and recorded with a fingerprint of the
plan (recipe text, seed, inputs, tensor layout). A resumed run reuses the shards whose
fingerprint and sha256 still match and recomputes the rest; since the math is
deterministic, the result is byte-identical to an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from mergecli.io.source import LocalSource
from mergecli.plan.types import MergePlan

PROGRESS = ".mergecli-progress.json"


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def input_files(plan: MergePlan, hashed: bool = False) -> list[dict[str, Any]]:
    """Per input: its reference, commit, and size and mtime of each local weight file
    (and its sha256 when `hashed`: `--verify`, so a resume trusts no size and mtime)."""
    out = []
    for ref, model in zip(plan.refs, plan.models):
        entry: dict[str, Any] = {"ref": str(ref), "commit": model.source.commit}
        if isinstance(model.source, LocalSource):
            entry["path"] = str(model.source.root)
            listed = set(model.source.files())
            files = sorted({t.file for t in model.tensors.values()} | ({"config.json"} & listed))
            stats = {name: (model.source.root / name).stat() for name in files}
            entry["files"] = {
                n: {"size": s.st_size, "mtime_ns": s.st_mtime_ns} for n, s in stats.items()
            }
            if hashed:
                for name, facts in entry["files"].items():
                    facts["sha256"] = sha256_file(model.source.root / name)
        out.append(entry)
    return out


def fingerprint(plan: MergePlan, recipe_text: str, inputs: list[dict[str, Any]]) -> str:
    """A hash of everything that decides the output bytes (`inputs`: `input_files`)."""
    layout = [(t.name, list(t.shape), t.dtype, t.shard) for t in plan.tensors]
    doc = {
        "recipe": recipe_text,
        "seed": plan.seed,
        "inputs": inputs,
        "shards": list(plan.shard_names),
        "layout": layout,
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def finished_shards(work: Path, plan: MergePlan, print_: str) -> dict[int, str]:
    """Shards recorded in `work` whose fingerprint and sha256 still match: index -> sha256."""
    path = work / PROGRESS
    if not path.is_file():
        return {}
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    if not isinstance(doc, dict) or doc.get("fingerprint") != print_:
        return {}
    done = {}
    for index, name in enumerate(plan.shard_names):
        recorded = (doc.get("shards") or {}).get(name)
        shard = work / name
        if recorded and shard.is_file() and sha256_file(shard) == recorded:
            done[index] = recorded
    return done


def record(work: Path, print_: str, shards: dict[str, str]) -> None:
    """Write the progress file atomically (temp file, then rename)."""
    temp = work / (PROGRESS + ".tmp")
    temp.write_text(json.dumps({"fingerprint": print_, "shards": shards}), encoding="utf-8")
    os.replace(temp, work / PROGRESS)
