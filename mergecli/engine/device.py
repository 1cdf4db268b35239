"""Where the math runs: CPU or a CUDA GPU."""

from __future__ import annotations

import torch

from mergecli.errors import UsageError


def resolve_device(name: str) -> torch.device:
    """`cpu`, `cuda` (an error when torch sees no GPU) or `auto` (cuda when available)."""
    available = torch.cuda.is_available()
    if name == "auto":
        return torch.device("cuda" if available else "cpu")
    if name == "cuda" and not available:
        raise UsageError(
            "--device cuda: torch sees no CUDA GPU "
            f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'none'})",
            hint="use --device cpu or auto, or install a CUDA build of torch",
        )
    return torch.device(name)
