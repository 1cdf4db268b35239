"""The memory model: a run's budget, each job's working bytes, the predicted peak."""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from mergecli.engine.blocks import BLOCK_ELEMENTS, row_blocks
from mergecli.engine.inputs import input_refs, work_dtype
from mergecli.engine.jobs import job_bytes, plan_jobs
from mergecli.errors import UsageError
from mergecli.io.reader import FOLDED_CACHE_BYTES, PART_CACHE_BYTES
from mergecli.plan.types import MergePlan, TensorPlan

PIPELINE_JOBS = 2


PIPELINE_BYTES = 1 << 30


RUNTIME_BYTES = 250 * 10**6  # interpreter, torch, plan: a run of the tiny family peaks at 0.25 GB


@dataclass(frozen=True)
class Budget:
    """How a run uses memory: jobs computed at once, row-block size, bytes for jobs."""

    workers: int = PIPELINE_JOBS
    block_elements: int = BLOCK_ELEMENTS
    job_bytes: int = PIPELINE_BYTES


def budget_for(plan: MergePlan, max_memory: int | None, workers: int = PIPELINE_JOBS) -> Budget:
    """The run settings that keep the predicted peak under `max_memory` bytes (when given):
    jobs get what the runtime leaves, and row blocks are sized so `workers` jobs fit."""
    if max_memory is None:
        return Budget(workers)
    room = max_memory - RUNTIME_BYTES - held_between_passes(plan, BLOCK_ELEMENTS)
    if room <= 0:
        raise UsageError(
            f"--max-memory {max_memory} bytes is below the runtime's own "
            f"{RUNTIME_BYTES // 10**6} MB",
            hint="give at least 1GB",
        )
    per_entry = max((job_bytes(plan, t, None) / max(t.numel, 1) for t in plan.tensors), default=4.0)
    block = int(room / workers / per_entry)
    return Budget(workers, max(1, min(BLOCK_ELEMENTS, block)), room)


def predict_peak(plan: MergePlan, budget: Budget) -> int:
    """Peak resident memory the run should reach: the runtime plus the largest set of jobs
    the pipeline admits at once (it admits like `run_pipeline`)."""
    pending: deque[int] = deque()
    in_flight = peak = 0
    for job in plan_jobs(plan, frozenset(), budget.block_elements):
        while not admits(budget, len(pending), in_flight, job.working_bytes):
            in_flight -= pending.popleft()
        pending.append(job.working_bytes)
        in_flight += job.working_bytes
        peak = max(peak, in_flight)
    return (
        RUNTIME_BYTES + peak + held_between_passes(plan, budget.block_elements) + factor_cache(plan)
    )


def factor_cache(plan: MergePlan) -> int:
    """Bytes the reader keeps for folding adapters: factors in float32 (`PART_CACHE_BYTES`
    at most) and folded blocks for later passes (`FOLDED_CACHE_BYTES`)."""
    parts = {
        (f.adapter.label, n): f.adapter.tensors[n].shape
        for m in plan.models
        for t in m.tensors.values()
        if (f := t.fold) is not None
        for n in (f.a, f.b, f.magnitude)
        if n is not None
    }
    if not parts:
        return 0
    passes = FOLDED_CACHE_BYTES if plan.method.needs_facts else 0
    return min(PART_CACHE_BYTES, sum(4 * math.prod(s) for s in parts.values())) + passes


INPUT_CACHE_BYTES = 96 << 20


def input_cache_bytes(plan: MergePlan, tensor: TensorPlan, block_elements: int) -> int:
    """Bytes of a blocked tensor's inputs (work dtype) that its statistics pass keeps for
    the merge pass, so that pass reads nothing: all of them when they fit in
    INPUT_CACHE_BYTES (the MLP and attention matrices of a 7B model do; embeddings do not),
    else none."""
    if plan.method.sums is None or len(row_blocks(plan, tensor, block_elements)) < 2:
        return 0
    size = len(input_refs(tensor)) * tensor.numel * work_dtype(plan, tensor).itemsize
    return size if size <= INPUT_CACHE_BYTES else 0


def held_between_passes(plan: MergePlan, block_elements: int) -> int:
    """Bytes a statistics pass hands to the merge pass of a blocked tensor: its keep bits
    (`MethodSpec.kept_bits`: a bit per entry and input) and its kept inputs
    (`input_cache_bytes`), for the two largest such tensors (the next tensor's statistics
    may be made while the last blocks of one are merged)."""
    sizes = sorted(
        kept_bits(plan, t, block_elements) + input_cache_bytes(plan, t, block_elements)
        for t in plan.tensors
    )
    return sum(sizes[-2:])


def kept_bits(plan: MergePlan, tensor: TensorPlan, block_elements: int) -> int:
    """Bytes of keep bits the statistics pass of a blocked tensor keeps for its merge."""
    if not plan.method.kept_bits or len(row_blocks(plan, tensor, block_elements)) < 2:
        return 0
    return len(tensor.inputs) * ((tensor.numel + 7) // 8)


def admits(budget: Budget, pending: int, in_flight: int, job: int, lookahead: int = 0) -> bool:
    """Whether the pipeline submits a job of `job` bytes now (else it first stores the
    oldest pending one); with nothing pending it always does. `lookahead` jobs beyond the
    workers may wait queued, so a worker whose job is done starts the next one while the
    oldest (a tensor's first block, which computes the statistics of all its blocks) still
    runs; the jobs computing at once are those admitted with no lookahead."""
    limit = budget.workers + lookahead
    return pending == 0 or (pending < limit and in_flight + job <= budget.job_bytes)
