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
from mergecli.engine.prefetch import Prefetcher
from mergecli.engine.process import uninterrupted
from mergecli.engine.stats import StatsCache
from mergecli.io.reader import TensorReader
from mergecli.io.source import LocalSource
from mergecli.io.writer import ShardWriter, output_error
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
    overwrite_any: bool = False,
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
    roots = [  # a folder model's folder is protected; a single-file model's file is
        m.source.root
        for m in plan.models
        if isinstance(m.source, LocalSource) and m.source.only is None
    ]
    output.check_output(out, overwrite, roots, overwrite_any)
    owned = output.start(out, resume)
    try:
        sink = _Output(plan, owned.path, recipe_text, progress, verify)
    except BaseException:
        with uninterrupted():
            output.discard(owned)
        raise
    reader = TensorReader(plan.models)
    stats = StatsCache(plan, reader, budget.block_elements, budget.workers)

    def compute(job: Job) -> Computed:
        if ahead is not None:
            ahead.started(job)
        chosen = stats.get(job)
        given = stats.take_inputs(job) if chosen is not None else None
        done = compute_tensor(
            plan,
            job.tensor,
            reader,
            sink.masks is not None,
            clamp_overflow,
            job.rows,
            chosen,
            device,
            given,
        )
        sink.writer.put(job.tensor.name, done.tensor, _offset(job))  # hashed in order by store
        return done

    def store(job: Job, done: Computed) -> None:
        sink.store(job, done)
        if job.final:
            stats.drop(job.index)

    ahead: Prefetcher | None = None
    try:
        sink.open()
        jobs = plan_jobs(plan, sink.keep, budget.block_elements)
        ahead = Prefetcher(plan, reader, jobs)
        run_pipeline(jobs, compute, store, budget)
        seconds = time.monotonic() - started
        files = sink.finish(None if reproducible else seconds)
        output.finish(owned, out, overwrite, overwrite_any)
    except BaseException:
        with uninterrupted():
            sink.abort()
            output.discard(owned)
        raise
    finally:
        if ahead is not None:
            ahead.close()
        stats.close()
        reader.close()
    total = plan.total_bytes
    return RunResult(out, files, seconds, len(plan.tensors), total, sink.clamped, len(sink.keep))


def _offset(job: Job) -> int:
    """Byte offset of a job's block within its tensor's data."""
    tensor = job.tensor
    return 0 if job.rows is None else job.rows[0] * (tensor.nbytes // tensor.shape[0])


class _Output:
    """The output being written in `work` (`OUT.partial`): shard and mask writers, the
    shards finished so far with their digests (the resume records), clamped counts."""

    def __init__(
        self,
        plan: MergePlan,
        work: Path,
        recipe_text: str,
        progress: Progress | None,
        verify: bool = False,
    ) -> None:
        self.plan, self.work, self.recipe_text, self.progress = plan, work, recipe_text, progress
        self.inputs = progress_file.input_files(plan, hashed=verify)
        self.writer = ShardWriter(work, plan.shard_names, plan.tensors)
        folder = mask_folder(plan)
        self.masks = (
            ShardWriter(work / folder, (MASKS_FILE,), mask_entries(plan)) if folder else None
        )
        self.print_ = progress_file.fingerprint(plan, recipe_text, self.inputs)
        finished = {} if self.masks else progress_file.finished_shards(work, plan, self.print_)
        self.keep = frozenset(finished)
        self.last = {t.shard: i for i, t in enumerate(plan.tensors)}
        self.recorded = {plan.shard_names[i]: digest for i, digest in finished.items()}
        self.clamped: dict[str, int] = {}

    def open(self) -> None:
        """Open the shards (keeping reused ones) and the masks file."""
        self.writer.open(self.keep)
        if self.masks is not None:
            self.masks.folder.mkdir(parents=True, exist_ok=True)
            self.masks.open()

    def store(self, job: Job, done: Computed) -> None:
        """Take a computed job in plan order: hash it, its masks, and a finished shard."""
        tensor = job.tensor
        self.writer.absorb(tensor.name, done.tensor, _offset(job))
        if done.clamped:
            self.clamped[tensor.name] = self.clamped.get(tensor.name, 0) + done.clamped
        for i, mask in enumerate(done.masks):
            packed = pack_mask(mask)
            offset = 0 if job.rows is None else job.rows[0] * (packed.numel() // packed.shape[0])
            self.masks.write(f"{tensor.name}:task{i}", packed, offset)  # type: ignore[union-attr]
        if job.final and self.last[tensor.shard] == job.index:
            digest = self.writer.finish_shard(tensor.shard)
            name = self.plan.shard_names[tensor.shard]
            self.recorded[name] = digest or progress_file.sha256_file(self.work / name)
            progress_file.record(self.work, self.print_, self.recorded)
        if job.final and self.progress is not None:
            self.progress(tensor)

    def finish(self, seconds: float | None) -> dict[str, str]:
        """Close the shards, write the side files and the manifest; the output's digests."""
        self.writer.close()
        (self.work / progress_file.PROGRESS).unlink(missing_ok=True)
        if self.masks is not None:
            self.masks.close()
        try:
            write_side_files(self.plan, self.work, self.writer, self.recipe_text)
            files = hash_files(self.work, self.recorded)
            write_manifest(self.plan, self.work, files, seconds, self.inputs)
        except OSError as exc:  # a full disk after the shards is still an output problem
            raise output_error(exc) from None
        return files

    def abort(self) -> None:
        """Close the writers of an unfinished output."""
        self.writer.abort()
        if self.masks is not None:
            self.masks.abort()
