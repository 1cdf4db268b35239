"""Models held in memory (a state dict and an optional config): the inputs of an
in-memory merge, planned and read like files."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergecli.errors import NotFoundError, UsageError
from mergecli.io.checkpoint import ModelInfo, TensorInfo
from mergecli.io.dtypes import TORCH_TO_CODE
from mergecli.io.header import Header

MEMORY_FILE = "<memory>"


@dataclass
class MemorySource:
    """A model with no files: its tensors are in `tensors`."""

    label: str
    tensors: Mapping[str, torch.Tensor]
    commit: str | None = None
    config: dict[str, Any] = field(default_factory=dict)

    def files(self) -> list[str]:
        """No files (no tokenizer, no side files)."""
        return []

    def local(self, filename: str) -> Path:
        """Always NotFoundError: an in-memory model has no files."""
        raise NotFoundError(f"{self.label}: an in-memory model has no file {filename}")

    def header(self, filename: str) -> Header:
        """Always NotFoundError: an in-memory model has no files."""
        raise NotFoundError(f"{self.label}: an in-memory model has no file {filename}")


def memory_model(
    label: str, tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any] | None = None
) -> ModelInfo:
    """A ModelInfo over in-memory tensors (dtypes and shapes taken from the tensors)."""
    infos = {}
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor) or tensor.dtype not in TORCH_TO_CODE:
            kind = getattr(tensor, "dtype", type(tensor).__name__)
            raise UsageError(f"{label}: `{name}` is not a tensor of a supported dtype ({kind})")
        infos[name] = TensorInfo(
            name, MEMORY_FILE, TORCH_TO_CODE[tensor.dtype], tuple(tensor.shape)
        )
    source = MemorySource(label, tensors, config=dict(config or {}))
    return ModelInfo(label, source, dict(config or {}), infos, "memory")
