"""Jobs: one unit of work per tensor or row block, with its estimated working memory."""

from __future__ import annotations

from dataclasses import dataclass

from mergecli.engine.blocks import block_numel, row_blocks
from mergecli.io.dtypes import ITEMSIZE
from mergecli.plan.types import MergePlan, TensorPlan


@dataclass(frozen=True)
class Job:
    """One unit of work: a tensor, or a block of its rows; `final` marks its last block."""

    index: int
    tensor: TensorPlan
    rows: tuple[int, int] | None
    final: bool
    working_bytes: int = 0


def plan_jobs(plan: MergePlan, keep: frozenset[int], block_elements: int) -> list[Job]:
    """Every job of the plan in order, leaving out tensors of reused shards."""
    jobs = []
    for index, tensor in enumerate(plan.tensors):
        if tensor.shard in keep:
            continue
        blocks = row_blocks(plan, tensor, block_elements)
        for k, rows in enumerate(blocks):
            final = k == len(blocks) - 1
            jobs.append(Job(index, tensor, rows, final, job_bytes(plan, tensor, rows)))
    return jobs


COPY_OVERHEAD = 12  # bytes held per byte of a copied block (measured: passthrough, 0.5b)


def job_bytes(plan: MergePlan, tensor: TensorPlan, rows: tuple[int, int] | None) -> int:
    """Estimated peak memory of computing `tensor` (or its `rows`): the method's measured
    float32 copies per input (`MethodSpec.peak_copies`), or COPY_OVERHEAD times the bytes of
    a copy."""
    numel = block_numel(tensor, rows)
    folding = fold_bytes(plan, tensor, rows)
    if tensor.copy:
        return COPY_OVERHEAD * numel * ITEMSIZE[tensor.dtype] + folding
    inputs = len(tensor.inputs) + (1 if tensor.base is not None else 0)
    if tensor.vocab_names is not None:
        inputs = len(tensor.vocab_names) + 2
    return int(plan.method.peak_copies * inputs * numel * 4) + folding


def fold_bytes(plan: MergePlan, tensor: TensorPlan, rows: tuple[int, int] | None) -> int:
    """Working bytes of folding an adapter into an input as it is read (one at a time): the
    stored base, it in float32, and the float32 result; a fold that needs the whole tensor
    (DoRA down columns) holds the whole tensor's."""
    most = 0
    for ref in (*tensor.inputs, *([tensor.base] if tensor.base else [])):
        found = plan.models[ref.model].tensors[ref.name].fold
        if found is None or found.replace is not None:
            continue
        whole = found.magnitude is not None and found.transposed
        numel = block_numel(tensor, None if whole else rows)
        most = max(most, numel * (8 + ITEMSIZE[found.base.dtype]))
    return most
