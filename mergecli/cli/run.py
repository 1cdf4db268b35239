"""`mergecli run`: validate, plan, merge, write, card."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

from mergecli.cli._common import plan_recipe, size_option
from mergecli.cli._console import STDERR
from mergecli.cli._options import (
    ClampOverflowOpt,
    Device,
    DeviceOpt,
    DryRunOpt,
    JsonOpt,
    MaxMemoryOpt,
    OutOpt,
    OverwriteAnyOpt,
    OverwriteOpt,
    ProgressOpt,
    QuietOpt,
    RecipeArg,
    ReproducibleOpt,
    ResumeOpt,
    SeedOpt,
    ShardSizeOpt,
    StrictOpt,
    ThreadsOpt,
    VerifyOpt,
)
from mergecli.engine.blocks import takes_whole
from mergecli.engine.device import resolve_device
from mergecli.engine.memory import PIPELINE_JOBS, Budget, budget_for, predict_peak
from mergecli.engine.process import share_cores, tune_malloc
from mergecli.engine.run import RunResult, run_plan
from mergecli.errors import Interrupted
from mergecli.output.card import card_license
from mergecli.output.folder import partial_dir
from mergecli.plan.types import MergePlan, TensorPlan
from mergecli.units import format_size

EXAMPLES = """
Examples:

  mergecli run recipes/quickstart.yaml -o merged/quickstart

  mergecli run my-merge.yaml -o out --shard-size 2GB --overwrite --json
"""


def run(
    recipe: RecipeArg,
    out: OutOpt,
    shard_size: ShardSizeOpt = "5GB",
    seed: SeedOpt = None,
    threads: ThreadsOpt = None,
    max_memory: MaxMemoryOpt = None,
    device: DeviceOpt = Device.cpu,
    dry_run: DryRunOpt = False,
    overwrite: OverwriteOpt = False,
    overwrite_any: OverwriteAnyOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    resume: ResumeOpt = False,
    verify: VerifyOpt = False,
    clamp_overflow: ClampOverflowOpt = False,
    reproducible: ReproducibleOpt = False,
    progress: ProgressOpt = False,
    strict: StrictOpt = False,
) -> None:
    """Merge the models of RECIPE into the folder OUT."""
    signal.signal(signal.SIGTERM, _terminate)
    started = time.monotonic()
    plan = plan_recipe(recipe, shard_size, seed, strict)
    budget = _budget(plan, max_memory, threads)
    where = resolve_device(device.value)
    if not quiet:
        _notes(plan)
    if dry_run:
        STDERR.print(
            f"dry run: {len(plan.tensors)} tensors, {format_size(plan.total_bytes)} would be written to {out}"
        )
        return
    text = recipe.read_text(encoding="utf-8")
    if plan.recipe.output is not None and plan.recipe.output.kind == "adapter":
        written = _adapter_output(plan, out, text, overwrite or overwrite_any)
        if as_json:
            print(json.dumps({"output": str(out), "kind": "adapter", **written}, indent=2))
        elif not quiet:
            STDERR.print(
                f"merged {written['modules']} modules into a rank-{written['rank']} adapter in {out}"
            )
        return
    show = not quiet and (progress or sys.stderr.isatty())
    options = RunOptions(
        overwrite or overwrite_any,
        reproducible,
        clamp_overflow,
        resume,
        verify,
        budget,
        where,
        overwrite_any,
    )
    try:
        result = _execute(plan, out, text, show, options)
    except KeyboardInterrupt:
        left = partial_dir(out)
        raise Interrupted(
            f"interrupted; {left} could not be removed: delete it"
            if left.exists()
            else "interrupted; no output folder was left behind"
        ) from None
    if result.reused_shards:
        STDERR.print(f"resumed: reused {result.reused_shards} of {len(plan.shard_names)} shards")
    for name, count in result.clamped.items():
        STDERR.print(
            f"warning: clamped {count} values of `{name}` to the output dtype's range", markup=False
        )
    if as_json:
        print(json.dumps(_summary(result, plan, time.monotonic() - started), indent=2))
    elif not quiet:
        STDERR.print(
            f"merged {result.tensors} tensors ({format_size(result.bytes_written)}) "
            f"into {out} in {result.seconds:.1f} s"
        )


def _adapter_output(
    plan: MergePlan, out: Path, recipe_text: str, overwrite: bool
) -> dict[str, Any]:
    """Write the adapter an `output: {kind: adapter}` recipe makes, atomically."""
    from mergecli.lora.merge_adapters import write_adapter_merge
    from mergecli.lora.merge_dense import write_dense_adapter
    from mergecli.output import folder as output
    from mergecli.output.manifest import hash_files
    from mergecli.output.side_files import write_json

    output.check_output(out, overwrite, [])
    work = output.start(out)
    try:
        spec = plan.recipe.output
        report: list[Any] = []
        if spec is not None and spec.combination is None:
            config, report = write_dense_adapter(plan, work.path)
        else:
            config = write_adapter_merge(plan, work.path, plan.seed or 0)
        (work.path / "mergecli_recipe.yaml").write_text(recipe_text, encoding="utf-8")
        (work.path / "README.md").write_text(
            f"---\nbase_model: {plan.recipe.base_model}\nlibrary_name: peft\ntags:\n- mergecli\n"
            f"- lora\n- merge\n---\n\n# A LoRA adapter merged with mergecli\n\n"
            f"{_made_by(plan)} of {len(plan.recipe.models or [])} adapters of `{plan.recipe.base_model}`, rank "
            f"{config['r']}.\n\n```yaml\n{recipe_text}```\n",
            encoding="utf-8",
        )
        files = hash_files(work.path, {})
        write_json(
            work.path / output.MANIFEST, {"tool": "mergecli", "kind": "adapter", "outputs": files}
        )
        output.finish(work, out, overwrite)
    except BaseException:
        output.discard(work)
        raise
    return {
        "rank": config["r"],
        "modules": len(config["target_modules"]),
        "tensors": [{"tensor": r.name, "rank": r.rank, "relative_error": r.error} for r in report],
    }


def _made_by(plan: MergePlan) -> str:
    spec = plan.recipe.output
    if spec is not None and spec.combination is not None:
        return f"PEFT combination `{spec.combination}`"
    return f"`{plan.method.name}` merge, factored to rank {spec.rank if spec else ''} by truncated SVD,"


def _notes(plan: MergePlan) -> None:
    for note in plan.notes:
        STDERR.print(f"note: {note}", markup=False)
    _, warning = card_license(plan)
    if warning:
        STDERR.print(f"warning: {warning}", markup=False)


def _terminate(signum: int, frame: object) -> None:
    """SIGTERM ends a run like Ctrl-C: clean up, exit 130."""
    raise KeyboardInterrupt


@dataclass(frozen=True)
class RunOptions:
    """How to write the output."""

    overwrite: bool
    reproducible: bool
    clamp_overflow: bool
    resume: bool
    verify: bool
    budget: Budget
    device: torch.device
    overwrite_any: bool = False


def _budget(plan: MergePlan, max_memory: str | None, threads: int | None) -> Budget:
    """Run settings from --max-memory and --threads; warn when the budget cannot be met."""
    limit = None if max_memory is None else size_option(max_memory, "--max-memory")
    budget = budget_for(plan, limit, threads or PIPELINE_JOBS)
    peak = predict_peak(plan, budget) if limit is not None else 0
    if limit is not None and peak > limit:
        why = (
            "rows of some tensors are too big for it"
            if plan.method.blockwise and not any(takes_whole(plan, t) for t in plan.tensors)
            else f"`{plan.method.name}` needs some tensors whole (it does not run in row blocks)"
        )
        STDERR.print(
            f"warning: predicted peak {format_size(peak)} is above --max-memory "
            f"{format_size(limit)}: {why}",
            markup=False,
        )
    return budget


def _execute(plan: MergePlan, out: Path, text: str, show: bool, options: RunOptions) -> RunResult:
    tune_malloc()
    share_cores(options.budget.workers)
    kwargs = {f.name: getattr(options, f.name) for f in dataclasses.fields(options)}
    if not show:
        return run_plan(plan, out, text, **kwargs)
    columns = (
        TextColumn("merging"),
        BarColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[size]}"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=STDERR, transient=True) as bar:
        task = bar.add_task("merge", total=plan.total_bytes, size="")
        done = [0]

        def advance(tensor: TensorPlan) -> None:
            done[0] += tensor.nbytes
            bar.update(task, advance=tensor.nbytes, size=format_size(done[0]))

        return run_plan(plan, out, text, progress=advance, **kwargs)


def _peak_rss() -> int:
    try:
        import resource

        scale = 1 if sys.platform == "darwin" else 1024
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale
    except ImportError:  # pragma: no cover - Windows
        return 0


def _summary(result: RunResult, plan: MergePlan, total: float) -> dict[str, object]:
    return {
        "status": "ok",
        "output": os.fspath(result.out),
        "method": plan.method.name,
        "tensors": result.tensors,
        "bytes_written": result.bytes_written,
        "files": result.files,
        "timings": {"merge_seconds": round(result.seconds, 3), "total_seconds": round(total, 3)},
        "peak_rss_bytes": _peak_rss(),
        "clamped": result.clamped,
    }


run.__doc__ = (run.__doc__ or "") + EXAMPLES
