"""Option and argument types shared by the commands."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

RecipeArg = Annotated[Path, typer.Argument(help="Recipe YAML file.", show_default=False)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")]
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
