"""Run a plan: stream tensor by tensor, merge, cast, write; write config, tokenizer, card.

Only the inputs of the tensor in flight are in memory. The output is assembled in
`OUT.partial` and moved into place only when complete."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from mergecli.engine.compute import Computed, compute_tensor
from mergecli.engine.jobs import Job, plan_jobs
from mergecli.engine.memory import Budget
from mergecli.engine.pipeline import run_pipeline
from mergecli.engine.stats import StatsCache
from mergecli.io.reader import TensorReader
from mergecli.io.source import LocalSource
from mergecli.io.writer import ShardWriter
from mergecli.output import folder as output
from mergecli.output import resume as progress_file
from mergecli.output.manifest import hash_files, write_manifest
from mergecli.output.masks import MASKS_FILE, mask_entries, mask_folder, pack_mask
from mergecli.output.side_files import write_side_files
from mergecli.plan.types import MergePlan, TensorPlan

Progress = Callable[[TensorPlan], None]


@dataclass(frozen=True)
class RunResult:
    """What a finished run produced."""

    out: Path
    files: dict[str, str]
    seconds: float
    tensors: int
    bytes_written: int
    clamped: dict[str, int]
    reused_shards: int = 0


def run_plan(
    plan: MergePlan,
    out: Path,
    recipe_text: str,
    overwrite: bool = False,
    progress: Progress | None = None,
    reproducible: bool = False,
    clamp_overflow: bool = False,
    resume: bool = False,
    verify: bool = False,
    block_elements: int | None = None,
    budget: Budget | None = None,
    device: torch.device | None = None,
) -> RunResult:
    """Execute `plan` into `out` atomically and return what was written.

    With `resume`, shards finished by an earlier run that was killed (and recorded in
    `OUT.partial`) are reused when their fingerprint and sha256 still match.
    """
    started = time.monotonic()
    budget = budget or Budget()
    if block_elements is not None:
        budget = replace(budget, block_elements=block_elements)
    block_elements = budget.block_elements
    roots = [m.source.root for m in plan.models if isinstance(m.source, LocalSource)]
    output.check_output(out, overwrite, roots)
    work = output.start(out, resume)
    writer = ShardWriter(work, plan.shard_names, plan.tensors)
    folder = mask_folder(plan)
    masks = ShardWriter(work / folder, (MASKS_FILE,), mask_entries(plan)) if folder else None
    print_ = progress_file.fingerprint(plan, recipe_text)
    finished = {} if masks else progress_file.finished_shards(work, plan, print_)
    keep = frozenset(finished)
    last = {t.shard: i for i, t in enumerate(plan.tensors)}
    recorded = {plan.shard_names[i]: digest for i, digest in finished.items()}
    reader = TensorReader()
    block_stats = StatsCache(plan, reader, block_elements, budget.workers)
    clamped: dict[str, int] = {}

    def offset_of(job: Job) -> int:
        tensor = job.tensor
        return 0 if job.rows is None else job.rows[0] * (tensor.nbytes // tensor.shape[0])

    def store(job: Job, done: Computed) -> None:
        tensor = job.tensor
        writer.absorb(tensor.name, done.tensor, offset_of(job))
        if done.clamped:
            clamped[tensor.name] = clamped.get(tensor.name, 0) + done.clamped
        for i, mask in enumerate(done.masks):
            masks.write(f"{tensor.name}:task{i}", pack_mask(mask))  # type: ignore[union-attr]
        if job.final and last[tensor.shard] == job.index:
            digest = writer.finish_shard(tensor.shard)
            name = plan.shard_names[tensor.shard]
            recorded[name] = digest or progress_file.sha256_file(work / name)
            progress_file.record(work, print_, recorded)
        if job.final:
            block_stats.drop(job.index)
        if job.final and progress is not None:
            progress(tensor)

    def compute(job: Job) -> Computed:
        chosen = block_stats.get(job)
        given = block_stats.take_inputs(job) if chosen is not None else None
        done = compute_tensor(
            plan,
            job.tensor,
            reader,
            masks is not None,
            clamp_overflow,
            job.rows,
            chosen,
            device,
            given,
        )
        writer.put(job.tensor.name, done.tensor, offset_of(job))  # hashed in order by `store`
        return done

    try:
        writer.open(keep)
        if masks is not None:
            masks.folder.mkdir(parents=True, exist_ok=True)
            masks.open()
        run_pipeline(plan_jobs(plan, keep, block_elements), compute, store, budget)
        writer.close()
        (work / progress_file.PROGRESS).unlink(missing_ok=True)
        if masks is not None:
            masks.close()
        write_side_files(plan, work, writer, recipe_text)
        seconds = time.monotonic() - started
        files = hash_files(work, recorded)
        write_manifest(plan, work, files, None if reproducible else seconds, verify)
        output.finish(work, out)
    except BaseException:
        writer.abort()
        if masks is not None:
            masks.abort()
        output.discard(work)
        raise
    finally:
        block_stats.close()
        reader.close()
    return RunResult(out, files, seconds, len(plan.tensors), plan.total_bytes, clamped, len(keep))
