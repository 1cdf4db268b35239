"""Per-task masks saved by methods that produce them (bit-packed, in a side folder)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from mergecli.plan.types import MergePlan

MASKS_FILE = "masks.safetensors"


@dataclass(frozen=True)
class MaskEntry:
    """One bit-packed mask in the masks file (shaped like a plan tensor for the writer)."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "U8"
    shard: int = 0

    @property
    def nbytes(self) -> int:
        """Bytes of the packed mask."""
        return math.prod(self.shape)


def mask_entries(plan: MergePlan) -> list[MaskEntry]:
    """`<tensor>:task<i>` for every merged tensor and task, packed along the last dim."""
    entries = []
    for tensor in plan.tensors:
        if tensor.copy or tensor.base is None:
            continue
        shape = tensor.shape or (1,)
        packed = (*shape[:-1], (shape[-1] + 7) // 8)
        entries += [MaskEntry(f"{tensor.name}:task{i}", packed) for i in range(len(tensor.inputs))]
    return entries


def mask_folder(plan: MergePlan) -> str | None:
    """The folder inside the output for per-task masks, when the method saves them."""
    if plan.method.masks is None:
        return None
    folders = {str(t.params["save_masks"]) for t in plan.tensors if t.params.get("save_masks")}
    return min(folders) if folders else None  # a method-wide parameter: one folder


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Bits of a bool mask packed along the last dimension (numpy.packbits order)."""
    flat = mask.reshape(mask.shape or (1,)).numpy()
    return torch.from_numpy(np.packbits(flat, axis=-1))
