"""Run a plan: stream tensor by tensor, merge, cast, write; write config, tokenizer, card.

Only the inputs of the tensor in flight are in memory. The output is assembled in
`OUT.partial` and moved into place only when complete.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mergecli import __version__
from mergecli import progress as progress_file
from mergecli.card import render_card
from mergecli.errors import NumericsError, UsageError
from mergecli.io import output
from mergecli.io.dtypes import CODE_TO_TORCH, ITEMSIZE, math_dtype
from mergecli.io.reader import TensorReader
from mergecli.io.source import LocalSource
from mergecli.io.writer import ShardWriter
from mergecli.methods.selection import Selection, Selector, zero_count
from mergecli.methods.spec import MergeArgs
from mergecli.plan import InputRef, MergePlan, TensorPlan
from mergecli.plan_vocab import source_model
from mergecli.reindex import merge_rows
from mergecli.vocab import union_document

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "spiece.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
Progress = Callable[[TensorPlan], None]
MASKS_FILE = "masks.safetensors"
BLOCK_ELEMENTS = 1 << 19
PIPELINE_JOBS = 2
PIPELINE_BYTES = 1 << 30
LOOKAHEAD = 2
SPARSE_MARGIN = 1.1
RUNTIME_BYTES = 250 * 10**6  # interpreter, torch, plan: a run of the tiny family peaks at 0.25 GB
COPY_OVERHEAD = 12  # bytes held per byte of a copied block (measured: passthrough, 0.5b)


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
    folders = {t.params.get("save_masks") for t in plan.tensors if not t.copy} - {None}
    return str(next(iter(folders))) if folders else None


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Bits of a bool mask packed along the last dimension (numpy.packbits order)."""
    flat = mask.reshape(mask.shape or (1,)).numpy()
    return torch.from_numpy(np.packbits(flat, axis=-1))


@dataclass(frozen=True)
class Computed:
    """One merged tensor, its per-task masks (when asked) and how many values were clamped."""

    tensor: torch.Tensor
    masks: list[torch.Tensor]
    clamped: int = 0


def compute_tensor(
    plan: MergePlan,
    tensor: TensorPlan,
    reader: TensorReader,
    with_masks: bool = False,
    clamp: bool = False,
    rows: tuple[int, int] | None = None,
    stats: BlockStats | None = None,
    device: torch.device | None = None,
    given: list[torch.Tensor] | None = None,
) -> Computed:
    """Read the inputs of one output tensor (or of its `rows` for element-wise methods),
    merge them in float32/64 and cast to its dtype; also return the method's per-task masks
    when asked. With `device` the math runs there (inputs moved after reading). `given`:
    the inputs already read (and checked) by the statistics pass."""
    out_dtype = CODE_TO_TORCH[tensor.dtype]
    if tensor.vocab_names is not None:
        return _compute_vocab(plan, tensor, reader, clamp)
    if tensor.copy:
        ref = tensor.inputs[0]
        return Computed(reader.read(plan.models[ref.model], ref.name, rows).to(out_dtype), [])
    work = _work_dtype(plan, tensor)
    check = not (stats and stats.inputs_checked)
    loaded = (
        [t.to(device) for t in given]
        if given is not None
        else [
            _load_checked(plan, r.model, r.name, reader, work, rows, device, check)
            for r in _refs(tensor)
        ]
    )
    base = loaded.pop() if tensor.base else None
    offset = 0 if rows is None else rows[0] * tensor.row_numel
    args = MergeArgs(
        loaded,
        base,
        tensor.params,
        tensor.per_model,
        tensor.name,
        plan.seed,
        stats.selections if stats else None,
        offset,
        stats.sums if stats else None,
        stats.kept if stats else None,
    )
    result = plan.method.fn(args)
    if tensor.post_scale is not None and base is not None:
        result = base + tensor.post_scale * (result - base)
    masks = plan.method.masks(args) if with_masks and plan.method.masks and base is not None else []
    cast, clamped = _cast_checked(result, out_dtype, tensor.name, clamp)
    return Computed(cast.cpu(), [m.cpu() for m in masks], clamped)


def _refs(tensor: TensorPlan) -> list[InputRef]:
    """The tensor's inputs, then its base when it has one."""
    return [*tensor.inputs, *([tensor.base] if tensor.base else [])]


def _work_dtype(plan: MergePlan, tensor: TensorPlan) -> torch.dtype:
    codes = [plan.models[r.model].tensors[r.name].dtype for r in _refs(tensor)]
    return math_dtype(tensor.dtype, codes)


BlockMap = Callable[
    [Callable[[tuple[int, int] | None], Any], Sequence[tuple[int, int] | None]], Any
]


def _serial(fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
    return [fn(item) for item in items]


def block_numel(tensor: TensorPlan, rows: tuple[int, int] | None) -> int:
    """Entries of `tensor`'s block `rows` (all of them for None)."""
    return tensor.numel if rows is None else (rows[1] - rows[0]) * tensor.row_numel


def block_selections(
    plan: MergePlan,
    tensor: TensorPlan,
    reader: TensorReader,
    blocks: Sequence[tuple[int, int] | None],
    map_blocks: BlockMap = _serial,
) -> dict[tuple[int, int] | None, list[list[Selection]]]:
    """Each block's top-k selections for a top-k method, found in two passes over the
    blocks (inputs are read block by block; no whole tensor is held). `map_blocks` may
    count blocks on several threads; results are added in block order."""
    assert plan.method.topk is not None and tensor.base is not None
    counts = [plan.method.topk(tensor.params, p, tensor.numel) for p in tensor.per_model]
    selectors = [[Selector(k, tensor.numel, len(blocks)) for k in c] for c in counts]
    base_ref = tensor.base

    def read(model: int, name: str, rows: tuple[int, int] | None) -> torch.Tensor:
        return _load_checked(plan, model, name, reader, torch.float32, rows)

    def wanted(pass_no: int, chosen: list[Selector]) -> list[Selector]:
        return [s for s in chosen if (not s.settled if pass_no == 0 else s.second_pass())]

    def deltas(rows: tuple[int, int] | None) -> Iterator[torch.Tensor | None]:
        base = read(base_ref.model, base_ref.name, rows)
        for ref, chosen in zip(tensor.inputs, selectors):
            yield read(ref.model, ref.name, rows).sub_(base) if chosen else None

    def zeros(rows: tuple[int, int] | None) -> list[int]:
        return [0 if d is None else zero_count(d) for d in deltas(rows)]

    def count(pass_no: int, rows: tuple[int, int] | None) -> list[list[torch.Tensor]]:
        found: list[list[torch.Tensor]] = []
        for chosen, delta in zip(selectors, deltas(rows)):
            if delta is None:
                found.append([])
                continue
            magnitude = delta.abs_()
            found.append([s.count(pass_no, magnitude) for s in wanted(pass_no, chosen)])
        return found

    first = zeros(blocks[0])
    if _looks_sparse(selectors, first, blocks[0], tensor):
        per_block = [first, *map_blocks(zeros, blocks[1:])]
        for i, chosen in enumerate(selectors):
            for selector in chosen:
                selector.settle_zeros([z[i] for z in per_block])
    for pass_no in (0, 1):
        if not any(wanted(pass_no, c) for c in selectors):
            continue
        for j, found in enumerate(map_blocks(partial(count, pass_no), blocks)):
            for chosen, histograms in zip(selectors, found):
                for selector, histogram in zip(wanted(pass_no, chosen), histograms):
                    selector.add(pass_no, j, histogram)
    return {
        rows: [[s.selection(j) for s in chosen] for chosen in selectors]
        for j, rows in enumerate(blocks)
    }


def _looks_sparse(
    selectors: list[list[Selector]],
    zeros: list[int],
    rows: tuple[int, int] | None,
    tensor: TensorPlan,
) -> bool:
    """Whether, judging by the first block, every model keeps all its nonzero entries with
    room to spare (then counting zeros may settle the thresholds without histograms; a
    wrong guess costs one cheap pass, never a different result)."""
    size = block_numel(tensor, rows)
    return (
        size > 0
        and any(selectors)
        and all(
            s.k >= SPARSE_MARGIN * (size - z) / size * tensor.numel
            for chosen, z in zip(selectors, zeros)
            for s in chosen
        )
    )


def block_sums(
    plan: MergePlan,
    tensor: TensorPlan,
    reader: TensorReader,
    blocks: Sequence[tuple[int, int] | None],
    map_blocks: BlockMap = _serial,
    keep_inputs: bool = False,
) -> tuple[list[list[float]], list[list[torch.Tensor | None]], list[list[torch.Tensor] | None]]:
    """A method's per-model sums (`MethodSpec.sums`) over the whole tensor, one block at a
    time: per-row partial sums of every block, added exactly at the end; each block's keep
    bits per model (`BlockSums.kept`); and, with `keep_inputs`, each block's inputs as read
    (for its merge, which then reads nothing)."""
    assert plan.method.sums is not None
    sums_of = plan.method.sums
    refs, work = _refs(tensor), _work_dtype(plan, tensor)
    bits = _BitStore(tensor, blocks)
    index = {rows: j for j, rows in enumerate(blocks)}

    def one(rows: tuple[int, int] | None) -> tuple[list[list[list[float]]], list[Any], Any]:
        loaded = [
            _load_checked(plan, r.model, r.name, reader, work, rows, check=False) for r in refs
        ]
        inputs = list(loaded)
        base = loaded.pop() if tensor.base else None
        offset = 0 if rows is None else rows[0] * tensor.row_numel
        args = MergeArgs(
            loaded, base, tensor.params, tensor.per_model, tensor.name, plan.seed, None, offset
        )
        found = sums_of(args)
        # plain floats at once: a small tensor left above the freed block temporaries
        # would pin them in the heap (RSS grew by a block per block)
        kept = [
            None if k is None else bits.keep(m, index[rows], k) for m, k in enumerate(found.kept)
        ]
        sums = [[r.tolist() for r in quantities] for quantities in found.sums]
        _check_unvouched(plan, refs, inputs, sums, tensor.base is not None)
        return sums, kept, inputs if keep_inputs else None

    parts, kept, inputs = zip(*map_blocks(one, blocks)) if blocks else ((), (), ())
    models = len(parts[0]) if parts else 0
    totals = [
        [math.fsum(x for p in parts for x in p[m][q]) for q in range(len(parts[0][m]))]
        for m in range(models)
    ]
    return totals, list(kept), list(inputs)


class _BitStore:
    """Keep bits of every block of a tensor in one allocation per model, made before the
    blocks' temporaries: small buffers left among freed temporaries pin them in the heap
    (a DARE run peaked at 2.8 GB instead of 1.2 GB). Pages never written cost nothing."""

    def __init__(self, tensor: TensorPlan, blocks: Sequence[tuple[int, int] | None]) -> None:
        packed = [(block_numel(tensor, rows) + 7) // 8 for rows in blocks]
        self.starts = [sum(packed[:j]) for j in range(len(packed))]
        self.models = [torch.empty(sum(packed), dtype=torch.uint8) for _ in tensor.inputs]

    def keep(self, model: int, block: int, packed: torch.Tensor) -> torch.Tensor:
        """Copy block `block`'s packed bits of `model` into the store; return that slice."""
        start = self.starts[block]
        return self.models[model][start : start + packed.numel()].copy_(packed)


@dataclass(frozen=True)
class BlockStats:
    """Whole-tensor facts a block of a blockwise method needs: top-k selections for this
    block, per-model sums over the tensor, this block's keep bits per model; whether the
    statistics pass read every input of the block through the NaN/Inf check."""

    selections: list[list[Selection]] | None = None
    sums: list[list[float]] | None = None
    kept: list[torch.Tensor | None] | None = None
    inputs_checked: bool = False


class _StatsCache:
    """Block stats per blocked tensor, computed once by the first job that needs them, its
    blocks on `workers` threads of its own (the jobs waiting for them would idle)."""

    def __init__(
        self, plan: MergePlan, reader: TensorReader, block_elements: int, workers: int = 1
    ) -> None:
        self.plan, self.reader, self.block_elements = plan, reader, block_elements
        self.lock = threading.Lock()
        self.found: dict[int, Future[dict[tuple[int, int] | None, BlockStats]]] = {}
        self.inputs: dict[tuple[str, tuple[int, int] | None], list[torch.Tensor]] = {}
        self.pool = ThreadPoolExecutor(max_workers=workers) if workers > 1 else None

    def get(self, job: _Job) -> BlockStats | None:
        method = self.plan.method
        if (method.topk is None and method.sums is None) or job.rows is None or job.tensor.copy:
            return None
        # the lock guards the table only: the main thread's `drop` and the jobs of other
        # tensors must not wait for a statistics pass
        with self.lock:
            found = self.found.get(job.index)
            owner = found is None
            if found is None:
                found = self.found[job.index] = Future()
        if owner:
            try:
                found.set_result(self._compute(job.tensor))
            except BaseException as exc:
                found.set_exception(exc)
                raise
        return found.result()[job.rows]

    def _map(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> Iterable[Any]:
        # results are taken in order as they come, not gathered: a tensor of 136 blocks
        # held 100 MB of histograms at once
        return _serial(fn, items) if self.pool is None else self.pool.map(fn, items)

    def _compute(self, tensor: TensorPlan) -> dict[tuple[int, int] | None, BlockStats]:
        blocks = row_blocks(self.plan, tensor, self.block_elements)
        method = self.plan.method
        chosen = (
            block_selections(self.plan, tensor, self.reader, blocks, self._map)
            if method.topk
            else {}
        )
        if method.sums is None:
            return {rows: BlockStats(chosen.get(rows)) for rows in blocks}
        keep = input_cache_bytes(self.plan, tensor, self.block_elements) > 0
        sums, kept, inputs = block_sums(self.plan, tensor, self.reader, blocks, self._map, keep)
        if keep:
            with self.lock:
                self.inputs.update(
                    ((tensor.name, rows), loaded)
                    for rows, loaded in zip(blocks, inputs)
                    if loaded is not None
                )
        return {  # `block_sums` read every input of every block through the check
            rows: BlockStats(chosen.get(rows), sums, kept[j] or None, inputs_checked=True)
            for j, rows in enumerate(blocks)
        }

    def take_inputs(self, job: _Job) -> list[torch.Tensor] | None:
        """The inputs the statistics pass read for this block, if it kept them (once)."""
        with self.lock:
            return self.inputs.pop((job.tensor.name, job.rows), None)

    def drop(self, index: int) -> None:
        with self.lock:
            self.found.pop(index, None)

    def close(self) -> None:
        """Stop the statistics threads."""
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)


def _compute_vocab(
    plan: MergePlan, tensor: TensorPlan, reader: TensorReader, clamp: bool
) -> Computed:
    """A per-token tensor: every model's rows re-indexed to the output vocabulary, merged."""
    assert plan.vocab is not None and tensor.vocab_names is not None
    names = tensor.vocab_names
    codes = [plan.models[m].tensors[n].dtype for m, n in names.items()]
    work = math_dtype(tensor.dtype, codes)
    loaded = {m: _load_checked(plan, m, n, reader, work, None) for m, n in names.items()}
    result = merge_rows(plan.vocab, tensor, loaded, plan.method, plan.seed)
    cast, clamped = _cast_checked(result, CODE_TO_TORCH[tensor.dtype], tensor.name, clamp)
    return Computed(cast, [], clamped)


def _finite_range(tensor: torch.Tensor) -> tuple[bool, float]:
    """(all finite, largest magnitude) in one pass without tensor-sized temporaries."""
    if tensor.numel() == 0:
        return True, 0.0
    low, high = (float(v) for v in torch.aminmax(tensor))
    finite = math.isfinite(low) and math.isfinite(high)
    return finite, max(abs(low), abs(high))


def _check_unvouched(
    plan: MergePlan,
    refs: Sequence[InputRef],
    inputs: Sequence[torch.Tensor],
    sums: Sequence[Sequence[Sequence[float]]],
    has_base: bool,
) -> None:
    """NaN/Inf check of a block's inputs that its statistics do not vouch for. Model i's
    sums (`MethodSpec.sums`) run over every entry of its tensor and of the base, so when
    they are finite so are those inputs (a NaN or Inf entry makes them NaN or Inf). Every
    other input, or all of them when a sum is not finite (finite inputs can overflow one),
    is checked entry by entry."""
    models = len(refs) - has_base
    present = [i for i in range(min(models, len(sums))) if sums[i]]
    finite = all(math.isfinite(x) for i in present for rows in sums[i] for x in rows)
    vouched = set(present) if finite else set()
    if has_base and vouched:
        vouched.add(models)  # the base is the last ref
    for i, (ref, tensor) in enumerate(zip(refs, inputs)):
        if i not in vouched:
            _check_finite(plan, ref.model, ref.name, tensor)


def _check_finite(plan: MergePlan, model: int, name: str, tensor: torch.Tensor) -> None:
    if not _finite_range(tensor)[0]:
        bad = int((~torch.isfinite(tensor)).sum())
        raise NumericsError(
            f"tensor `{name}` of {plan.models[model].label} holds {bad} NaN/Inf values",
            hint="the input checkpoint is damaged; re-download or re-save it",
        )


def _load_checked(
    plan: MergePlan,
    model: int,
    name: str,
    reader: TensorReader,
    work: torch.dtype,
    rows: tuple[int, int] | None,
    device: torch.device | None = None,
    check: bool = True,
) -> torch.Tensor:
    tensor = reader.read(plan.models[model], name, rows).to(device).to(work)
    if check:
        _check_finite(plan, model, name, tensor)
    return tensor


def _cast_checked(
    result: torch.Tensor, out_dtype: torch.dtype, name: str, clamp: bool
) -> tuple[torch.Tensor, int]:
    """Cast to the output dtype; values beyond its range are an error, or clamped (counted)."""
    finite, peak = _finite_range(result)
    if not finite:
        raise NumericsError(
            f"merged tensor `{name}` has NaN/Inf values", hint="check the method's parameters"
        )
    over = 0
    if out_dtype.is_floating_point and peak > torch.finfo(out_dtype).max:
        limit = torch.finfo(out_dtype).max
        over = int((result.abs() > limit).sum())
        if not clamp:
            raise NumericsError(
                f"merged tensor `{name}` reaches {peak:.4g}, beyond the {out_dtype} range ({limit:.4g})",
                hint="use out_dtype: bfloat16 or float32, or pass --clamp-overflow",
            )
        if over:
            result = result.clamp(-limit, limit)
    return result.to(out_dtype), over


def row_blocks(
    plan: MergePlan, tensor: TensorPlan, block_elements: int
) -> list[tuple[int, int] | None]:
    """Row ranges to compute `tensor` in: one block (None) unless the method is element-wise
    (or the tensor a copy) and the tensor is larger than `block_elements`."""
    blockable = (tensor.copy or plan.method.blockwise) and tensor.vocab_names is None
    if not blockable or tensor.numel <= block_elements or len(tensor.shape) < 2:
        return [None]
    if (
        not tensor.copy
        and plan.method.topk is not None
        and _work_dtype(plan, tensor) != torch.float32
    ):
        return [None]
    rows = tensor.shape[0]
    step = max(1, block_elements // tensor.row_numel)
    return [(start, min(rows, start + step)) for start in range(0, rows, step)]


@dataclass(frozen=True)
class _Job:
    """One unit of work: a tensor, or a block of its rows; `final` marks its last block."""

    index: int
    tensor: TensorPlan
    rows: tuple[int, int] | None
    final: bool
    working_bytes: int = 0


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


def job_bytes(plan: MergePlan, tensor: TensorPlan, rows: tuple[int, int] | None) -> int:
    """Estimated peak memory of computing `tensor` (or its `rows`): the method's measured
    float32 copies per input (`MethodSpec.peak_copies`), or COPY_OVERHEAD times the bytes of
    a copy."""
    numel = block_numel(tensor, rows)
    if tensor.copy:
        return COPY_OVERHEAD * numel * ITEMSIZE[tensor.dtype]
    inputs = len(tensor.inputs) + (1 if tensor.base is not None else 0)
    if tensor.vocab_names is not None:
        inputs = len(tensor.vocab_names) + 2
    return int(plan.method.peak_copies * inputs * numel * 4)


def plan_jobs(plan: MergePlan, keep: frozenset[int], block_elements: int) -> list[_Job]:
    """Every job of the plan in order, leaving out tensors of reused shards."""
    jobs = []
    for index, tensor in enumerate(plan.tensors):
        if tensor.shard in keep:
            continue
        blocks = row_blocks(plan, tensor, block_elements)
        for k, rows in enumerate(blocks):
            final = k == len(blocks) - 1
            jobs.append(_Job(index, tensor, rows, final, job_bytes(plan, tensor, rows)))
    return jobs


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


def _admits(budget: Budget, pending: int, in_flight: int, job: int, lookahead: int = 0) -> bool:
    """Whether the pipeline submits a job of `job` bytes now (else it first stores the
    oldest pending one); with nothing pending it always does. `lookahead` jobs beyond the
    workers may wait queued, so a worker whose job is done starts the next one while the
    oldest (a tensor's first block, which computes the statistics of all its blocks) still
    runs; the jobs computing at once are those admitted with no lookahead."""
    limit = budget.workers + lookahead
    return pending == 0 or (pending < limit and in_flight + job <= budget.job_bytes)


def predict_peak(plan: MergePlan, budget: Budget) -> int:
    """Peak resident memory the run should reach: the runtime plus the largest set of jobs
    the pipeline admits at once (it admits like `_pipeline`)."""
    pending: deque[int] = deque()
    in_flight = peak = 0
    for job in plan_jobs(plan, frozenset(), budget.block_elements):
        while not _admits(budget, len(pending), in_flight, job.working_bytes):
            in_flight -= pending.popleft()
        pending.append(job.working_bytes)
        in_flight += job.working_bytes
        peak = max(peak, in_flight)
    return RUNTIME_BYTES + peak + held_between_passes(plan, budget.block_elements)


INPUT_CACHE_BYTES = 96 << 20


def input_cache_bytes(plan: MergePlan, tensor: TensorPlan, block_elements: int) -> int:
    """Bytes of a blocked tensor's inputs (work dtype) that its statistics pass keeps for
    the merge pass, so that pass reads nothing: all of them when they fit in
    INPUT_CACHE_BYTES (the MLP and attention matrices of a 7B model do; embeddings do not),
    else none."""
    if plan.method.sums is None or len(row_blocks(plan, tensor, block_elements)) < 2:
        return 0
    size = len(_refs(tensor)) * tensor.numel * _work_dtype(plan, tensor).itemsize
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


def _pipeline(
    jobs: list[_Job],
    compute: Callable[[_Job], Computed],
    store: Callable[[_Job, Computed], None],
    budget: Budget,
) -> None:
    """Compute up to `budget.workers` jobs at once (reading overlaps math) while their
    estimated working memory stays under `budget.job_bytes`; store results in plan order.
    A job larger than the budget runs alone."""
    pending: deque[tuple[_Job, Future[Computed]]] = deque()
    in_flight = 0
    with ThreadPoolExecutor(max_workers=budget.workers) as pool:
        try:
            for job in jobs:
                while not _admits(budget, len(pending), in_flight, job.working_bytes, LOOKAHEAD):
                    done_job, future = pending.popleft()
                    store(done_job, future.result())
                    in_flight -= done_job.working_bytes
                pending.append((job, pool.submit(compute, job)))
                in_flight += job.working_bytes
            while pending:
                done_job, future = pending.popleft()
                store(done_job, future.result())
        except BaseException:
            for _, future in pending:
                future.cancel()
            raise


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
    block_stats = _StatsCache(plan, reader, block_elements, budget.workers)
    clamped: dict[str, int] = {}

    def offset_of(job: _Job) -> int:
        tensor = job.tensor
        return 0 if job.rows is None else job.rows[0] * (tensor.nbytes // tensor.shape[0])

    def store(job: _Job, done: Computed) -> None:
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

    def compute(job: _Job) -> Computed:
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
        _pipeline(plan_jobs(plan, keep, block_elements), compute, store, budget)
        writer.close()
        (work / progress_file.PROGRESS).unlink(missing_ok=True)
        if masks is not None:
            masks.close()
        _write_side_files(plan, work, writer, recipe_text)
        seconds = time.monotonic() - started
        files = _hash_files(work, recorded)
        _write_manifest(plan, work, files, None if reproducible else seconds, verify)
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


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


STALE_WITH_UNION = frozenset(
    {"tokenizer.json", "vocab.json", "merges.txt", "tokenizer.model", "spiece.model",
     "added_tokens.json", "vocab.txt"}
)  # fmt: skip


def _write_side_files(plan: MergePlan, work: Path, writer: ShardWriter, recipe_text: str) -> None:
    _write_json(work / "model.safetensors.index.json", writer.index())
    _write_json(work / "config.json", plan.config)
    template = plan.models[plan.template].source
    if "generation_config.json" in template.files():
        shutil.copyfile(template.local("generation_config.json"), work / "generation_config.json")
    tok_source = plan.models[source_model(plan.recipe, plan.refs, plan.template)].source
    union = plan.vocab is not None and bool(plan.vocab.new_tokens)
    available = set(tok_source.files())
    for name in TOKENIZER_FILES:
        if name in available and not (union and name in STALE_WITH_UNION):
            shutil.copyfile(tok_source.local(name), work / name)
    if union:
        _write_union_tokenizer(plan, work)
    if plan.chat_template is not None:
        _write_chat_template(work, plan.chat_template)
    (work / "mergecli_recipe.yaml").write_text(recipe_as_run(plan, recipe_text), encoding="utf-8")
    (work / "README.md").write_text(render_card(plan, recipe_text), encoding="utf-8")


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _write_union_tokenizer(plan: MergePlan, work: Path) -> None:
    """tokenizer.json with the union's tokens; tokenizer_config.json lists new added tokens."""
    assert plan.vocab is not None
    new = plan.vocab.new_tokens
    template = _read_json(plan.models[plan.template].source.local("tokenizer.json"))
    documents = {
        m: _read_json(plan.models[m].source.local("tokenizer.json"))
        for m in dict.fromkeys(t.model for t in new)
    }
    merged = union_document(template, documents, new)
    _write_json(work / "tokenizer.json", merged)
    config_path = work / "tokenizer_config.json"
    if not config_path.exists():
        return
    config = _read_json(config_path)
    decoder = config.get("added_tokens_decoder")
    if isinstance(decoder, dict):
        for entry in merged.get("added_tokens") or []:
            fields = {k: v for k, v in entry.items() if k != "id"}
            decoder.setdefault(str(entry["id"]), fields)
    _write_json(config_path, config)


def recipe_as_run(plan: MergePlan, recipe_text: str) -> str:
    """The recipe verbatim, plus comment lines pinning each Hub model to its commit."""
    pins = [
        f"#   {ref} -> {model.source.commit}"
        for ref, model in zip(plan.refs, plan.models)
        if not isinstance(model.source, LocalSource)
    ]
    if not pins:
        return recipe_text
    return (
        recipe_text.rstrip("\n")
        + "\n\n# Hub revisions resolved by mergecli:\n"
        + "\n".join(pins)
        + "\n"
    )


def _write_chat_template(work: Path, template: str) -> None:
    (work / "chat_template.jinja").write_text(template, encoding="utf-8")
    config_path = work / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.exists() else {}
    config["chat_template"] = template
    _write_json(config_path, config)


def _hash_files(work: Path, known: dict[str, str]) -> dict[str, str]:
    """sha256 of every output file; shards hashed when they were finished are not re-read."""
    out = {}
    for path in sorted(work.rglob("*")):
        name = path.relative_to(work).as_posix()
        if path.is_file() and path.name != output.MARKER:
            out[name] = known.get(name) or progress_file.sha256_file(path)
    return out


def _write_manifest(
    plan: MergePlan, work: Path, files: dict[str, str], seconds: float | None, verify: bool
) -> None:
    inputs = progress_file.input_files(plan)
    if verify:
        for entry in inputs:
            root = Path(entry["path"]) if "path" in entry else None
            for name, facts in (entry.get("files") or {}).items():
                facts["sha256"] = progress_file.sha256_file(root / name)  # type: ignore[operator]
    recipe_text = (work / "mergecli_recipe.yaml").read_bytes()
    manifest = {
        "tool": "mergecli",
        "version": __version__,
        "method": plan.method.name,
        "seed": plan.seed,
        "recipe_sha256": hashlib.sha256(recipe_text).hexdigest(),
        "inputs": inputs,
        "outputs": files,
    }
    if seconds is not None:
        manifest["wall_seconds"] = round(seconds, 3)
    _write_json(work / "mergecli_manifest.json", manifest)
