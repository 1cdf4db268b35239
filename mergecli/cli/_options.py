"""Option and argument types shared by the commands."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

RecipeArg = Annotated[Path, typer.Argument(help="Recipe YAML file.", show_default=False)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")]
StrictOpt = Annotated[
    bool,
    typer.Option(
        "--strict",
        help="Refuse recipe keys that are only warned about (keys mergekit ignores that "
        "change nothing here, such as a restated default): for CI.",
    ),
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress or notes on stderr.")]
ShardSizeOpt = Annotated[
    str, typer.Option("--shard-size", help="Largest output shard, with units: 5GB, 500MB, 2GiB.")
]
SeedOpt = Annotated[
    int | None,
    typer.Option("--seed", min=0, help="Seed for random methods (overrides the recipe's)."),
]
MaxMemoryOpt = Annotated[
    str | None,
    typer.Option(
        "--max-memory",
        help="Peak memory to stay under, with units (e.g. 1GB): smaller row blocks and fewer "
        "jobs at once.",
    ),
]
ThreadsOpt = Annotated[
    int | None,
    typer.Option("--threads", min=1, help="Tensors (or row blocks) computed at once; default 2."),
]


class Device(str, Enum):
    """Where the math runs."""

    cpu = "cpu"
    cuda = "cuda"
    auto = "auto"


DeviceOpt = Annotated[
    Device,
    typer.Option("--device", help="Where the math runs: cpu, cuda, or auto (cuda when available)."),
]


# options of `mergecli run`
OutOpt = Annotated[
    Path, typer.Option("--out", "-o", help="Output folder (must not exist or be empty).")
]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Validate and plan, write nothing.")]
OverwriteOpt = Annotated[
    bool,
    typer.Option(
        "--overwrite", help="Replace an existing output folder that is a mergecli output."
    ),
]
OverwriteAnyOpt = Annotated[
    bool,
    typer.Option(
        "--overwrite-any",
        help="Replace an existing output folder whatever it holds (deletes its files).",
    ),
]
ResumeOpt = Annotated[
    bool,
    typer.Option(
        "--resume",
        help="Reuse shards finished by a killed run of the same recipe (in OUT.partial).",
    ),
]
VerifyOpt = Annotated[
    bool,
    typer.Option("--verify", help="Hash every local input file into the manifest (slower)."),
]
ClampOverflowOpt = Annotated[
    bool,
    typer.Option(
        "--clamp-overflow",
        help="Clamp values beyond the output dtype's range (reported) instead of failing.",
    ),
]
ReproducibleOpt = Annotated[
    bool,
    typer.Option(
        "--reproducible", help="Leave timings out of the manifest: byte-identical reruns."
    ),
]
ProgressOpt = Annotated[
    bool, typer.Option("--progress", help="Show progress even when stderr is not a terminal.")
]
