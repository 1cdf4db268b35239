"""Row blocks and jobs: how a tensor is cut for computing, one job per block."""

from __future__ import annotations

import math

import torch

from mergecli.engine.inputs import work_dtype
from mergecli.methods.kernels import bernoulli
from mergecli.plan.types import MergePlan, TensorPlan

BLOCK_ELEMENTS = 1 << 19


def block_numel(tensor: TensorPlan, rows: tuple[int, int] | None) -> int:
    """Entries of `tensor`'s block `rows` (all of them for None)."""
    return tensor.numel if rows is None else (rows[1] - rows[0]) * tensor.row_numel


def row_blocks(
    plan: MergePlan, tensor: TensorPlan, block_elements: int
) -> list[tuple[int, int] | None]:
    """Row ranges to compute `tensor` in: one block (None) unless the method is element-wise
    (or the tensor a copy) and the tensor is larger than `block_elements`."""
    blockable = (tensor.copy or plan.method.blockwise) and tensor.vocab_names is None
    if not blockable or tensor.numel <= block_elements or len(tensor.shape) < 2:
        return [None]
    if takes_whole(plan, tensor):
        return [None]
    if (
        not tensor.copy
        and (plan.method.topk is not None or plan.method.score is not None)
        and work_dtype(plan, tensor) != torch.float32
    ):
        return [None]
    rows = tensor.shape[0]
    unit = _aligned_rows(plan, tensor) if not tensor.copy else 1
    step = max(unit, block_elements // tensor.row_numel // unit * unit)
    if unit > 1 and step >= rows:
        return [None]
    return [(start, min(rows, start + step)) for start in range(0, rows, step)]


def takes_whole(plan: MergePlan, tensor: TensorPlan) -> bool:
    """Whether the method needs this tensor whole for its parameters or shape
    (`MethodSpec.whole_when`), though it runs others in row blocks."""
    whole_when = plan.method.whole_when
    if tensor.copy or whole_when is None:
        return False
    return whole_when(tensor.params, tuple(tensor.shape))


def _aligned_rows(plan: MergePlan, tensor: TensorPlan) -> int:
    """The rows a block starts at a multiple of: the method's row group, and rows whose
    entries are a multiple of the draw chunk for chunk-aligned methods (else 1)."""
    unit = max(1, plan.method.row_group)
    if plan.method.chunk_aligned:
        chunk = bernoulli.DRAW_CHUNK
        unit = math.lcm(unit, chunk // math.gcd(chunk, tensor.row_numel))
    return unit
