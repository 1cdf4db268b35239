"""Statistics passes over a tensor's row blocks: the whole-tensor facts each block needs."""

from __future__ import annotations

import itertools
import math
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import torch

from mergecli.engine.blocks import block_numel, row_blocks
from mergecli.engine.inputs import input_refs, load_all, load_checked, merge_args, work_dtype
from mergecli.engine.jobs import Job
from mergecli.engine.memory import input_cache_bytes
from mergecli.engine.numerics import check_unvouched
from mergecli.io.reader import TensorReader
from mergecli.methods.kernels.selection import Selection, Selector, zero_count
from mergecli.methods.kernels.sums import add_groups, largest
from mergecli.methods.spec import BlockSums, MergeArgs, TensorFacts, Totals
from mergecli.plan.types import MergePlan, TensorPlan

SPARSE_MARGIN = 1.1


BlockMap = Callable[
    [Callable[[tuple[int, int] | None], Any], Sequence[tuple[int, int] | None]], Any
]


def serial(fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
    return [fn(item) for item in items]


def block_selections(
    plan: MergePlan,
    tensor: TensorPlan,
    reader: TensorReader,
    blocks: Sequence[tuple[int, int] | None],
    map_blocks: BlockMap = serial,
) -> dict[tuple[int, int] | None, list[list[Selection]]]:
    """Each block's top-k selections for a top-k method, found in two passes over the
    blocks (inputs are read block by block; no whole tensor is held). `map_blocks` may
    count blocks on several threads; results are added in block order."""
    assert plan.method.topk is not None and tensor.base is not None
    counts = [plan.method.topk(tensor.params, p, tensor.numel) for p in tensor.per_model]
    selectors = [[Selector(k, tensor.numel, len(blocks)) for k in c] for c in counts]
    base_ref = tensor.base

    def read(model: int, name: str, rows: tuple[int, int] | None) -> torch.Tensor:
        # unchecked: the merge pass checks every input; a NaN here only picks thresholds
        return load_checked(plan, model, name, reader, torch.float32, rows, check=False)

    def deltas(rows: tuple[int, int] | None) -> Iterator[torch.Tensor | None]:
        with reader.sharing():
            base = read(base_ref.model, base_ref.name, rows)
            for ref, chosen in zip(tensor.inputs, selectors):
                if not chosen:
                    yield None
                    continue
                found = read(ref.model, ref.name, rows)
                yield found - base if found is base else found.sub_(base)

    def zeros(rows: tuple[int, int] | None) -> list[int]:
        return _zero_counts(deltas(rows))

    def magnitudes(rows: tuple[int, int] | None) -> Iterator[torch.Tensor | None]:
        return (None if delta is None else delta.abs_() for delta in deltas(rows))

    first_deltas = list(deltas(blocks[0]))
    first = _zero_counts(first_deltas)
    if len(blocks) > 1:  # the first block predicts where each threshold lies
        for chosen, delta in zip(selectors, first_deltas):
            if delta is not None:
                magnitude = delta.abs()
                for selector in chosen:
                    selector.predict(magnitude)
    del first_deltas
    if _looks_sparse(selectors, first, blocks[0], tensor):
        per_block = [first, *map_blocks(zeros, blocks[1:])]
        for i, chosen in enumerate(selectors):
            for selector in chosen:
                selector.settle_zeros([z[i] for z in per_block])
    _count_passes(selectors, magnitudes, blocks, map_blocks)
    return {
        rows: [[s.selection(j) for s in chosen] for chosen in selectors]
        for j, rows in enumerate(blocks)
    }


def _wanted(pass_no: int, chosen: list[Selector]) -> list[Selector]:
    """The selectors that count in pass `pass_no` (pass 0: those not settled by zeros)."""
    return [s for s in chosen if (not s.settled if pass_no == 0 else s.second_pass())]


def _count_passes(
    selectors: list[list[Selector]],
    values: Callable[[tuple[int, int] | None], Iterable[torch.Tensor | None]],
    blocks: Sequence[tuple[int, int] | None],
    map_blocks: BlockMap,
) -> None:
    """Both counting passes of every selector over the blocks: `values(rows)` gives each
    group's non-negative float32 values of a block (None for a group without selectors)."""

    def count(pass_no: int, rows: tuple[int, int] | None) -> list[list[torch.Tensor]]:
        found: list[list[torch.Tensor]] = []
        for chosen, value in zip(selectors, values(rows)):
            if value is None:
                found.append([])
                continue
            found.append([s.count(pass_no, value) for s in _wanted(pass_no, chosen)])
        return found

    for pass_no in (0, 1):
        if pass_no == 1:  # here, not on the counting threads: it may take pass 0's window
            for selector in (s for c in selectors for s in c if 0 < s.k < s.numel):
                selector.bucket_above()
        if not any(_wanted(pass_no, c) for c in selectors):
            continue
        for j, found in enumerate(map_blocks(partial(count, pass_no), blocks)):
            for chosen, histograms in zip(selectors, found):
                for selector, histogram in zip(_wanted(pass_no, chosen), histograms):
                    selector.add(pass_no, j, histogram)


def block_ranked(
    plan: MergePlan,
    tensor: TensorPlan,
    reader: TensorReader,
    blocks: Sequence[tuple[int, int] | None],
    map_blocks: BlockMap = serial,
    priors: Sequence[Totals] = (),
) -> dict[tuple[int, int] | None, list[list[Selection]]]:
    """Each block's selections of each of the method's scores (`MethodSpec.score`, made
    with the earlier passes' `priors`), exact over the whole tensor, found in two passes
    over the blocks as `block_selections` finds its."""
    score_of, topk = plan.method.score, plan.method.score_topk
    assert score_of is not None and topk is not None
    counts = topk(tensor.params, tensor.numel)
    if not counts:
        return {rows: [] for rows in blocks}
    refs = input_refs(tensor)

    def scores(rows: tuple[int, int] | None) -> list[torch.Tensor]:
        # unchecked: the merge pass checks every input
        loaded = load_all(plan, refs, reader, torch.float32, rows, check=False)
        return score_of(merge_args(plan, tensor, loaded, rows, partial(_prior_facts, priors)))

    first = scores(blocks[0])
    selectors = [[Selector(k, tensor.numel, len(blocks)) for k in counts] for _ in first]
    if len(blocks) > 1:  # the first block predicts where each threshold lies
        for chosen, sample in zip(selectors, first):
            for selector in chosen:
                selector.predict(sample)
    del first
    _count_passes(selectors, scores, blocks, map_blocks)
    return {
        rows: [[s.selection(j) for s in chosen] for chosen in selectors]
        for j, rows in enumerate(blocks)
    }


def _prior_facts(priors: Sequence[Totals], offset: int) -> TensorFacts:
    return TensorFacts(priors=priors, offset=offset)


def _zero_counts(deltas: Iterable[torch.Tensor | None]) -> list[int]:
    """Each task vector's count of zero entries (0 for a model without a selection)."""
    return [0 if d is None else zero_count(d) for d in deltas]


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


@dataclass
class SumsFound:
    """What a statistics pass found over a tensor's blocks (see `block_sums`)."""

    sums: list[list[float]]
    kept: list[list[torch.Tensor | None]]
    inputs: list[list[torch.Tensor] | None]
    grouped: list[list[torch.Tensor]]
    peaks: list[list[float]]
    empty: bool = False  # the first block found nothing: the pass stopped there


def block_sums(
    plan: MergePlan,
    tensor: TensorPlan,
    reader: TensorReader,
    blocks: Sequence[tuple[int, int] | None],
    map_blocks: BlockMap = serial,
    keep_inputs: bool = False,
    ranked: Mapping[tuple[int, int] | None, list[list[Selection]]] | None = None,
    stage: Callable[[MergeArgs], BlockSums] | None = None,
    priors: Sequence[Totals] = (),
    check: bool = True,
) -> SumsFound:
    """A method's per-model sums (`MethodSpec.sums`) over the whole tensor, one block at a
    time: per-row partial sums of every block, added exactly at the end; its sums over dim
    0, added group by group in block order; each block's keep bits per model
    (`BlockSums.kept`); and, with `keep_inputs`, each block's inputs as read (for its
    merge, which then reads nothing). `ranked`: each block's selections of the method's
    scores, which its sums may use; `stage`: one of the method's earlier passes
    (`MethodSpec.priors`) instead of its sums, seeing the `priors` before it; the maxima of
    its per-row peaks. Without `check`, an earlier pass has checked the inputs."""
    sums_of = stage or plan.method.sums
    assert sums_of is not None
    refs, work = input_refs(tensor), work_dtype(plan, tensor)
    bits = _BitStore(tensor, blocks)
    index = {rows: j for j, rows in enumerate(blocks)}

    def one(rows: tuple[int, int] | None) -> tuple[Any, ...]:
        loaded = load_all(plan, refs, reader, work, rows, check=False)
        inputs = list(loaded)
        chosen = ranked[rows] if ranked else ()
        facts = merge_args(
            plan,
            tensor,
            loaded,
            rows,
            lambda at: TensorFacts(ranked=chosen, offset=at, priors=priors),
        )
        found = sums_of(facts)
        # plain floats at once: a small tensor left above the freed block temporaries
        # would pin them in the heap (RSS would grow by a block per block)
        kept = [
            None if k is None else bits.keep(m, index[rows], k) for m, k in enumerate(found.kept)
        ]
        sums = [[r.tolist() for r in quantities] for quantities in found.sums]
        peaks = [[largest(r) for r in q] for q in found.peaks]
        if check:
            check_unvouched(plan, refs, inputs, sums, tensor.base is not None)
        return sums, kept, inputs if keep_inputs else None, found.grouped, peaks

    result = SumsFound([], [], [], [], [])
    parts: list[list[list[list[float]]]] = []
    grouped: list[list[torch.Tensor | None]] = []
    first = one(blocks[0]) if blocks else None
    if first is not None and not _finds_anything(first):
        return replace(result, empty=True)  # these parameters need no statistics: skip
    rest = map_blocks(one, blocks[1:])
    for sums, kept, inputs, partials, peaks in itertools.chain([first] if first else [], rest):
        result.peaks = [
            [max(a, b) for a, b in zip(old, new)] for old, new in zip(result.peaks, peaks)
        ] or peaks
        parts.append(sums)
        result.kept.append(kept)
        result.inputs.append(inputs)
        grouped = grouped or [[None] * len(model) for model in partials]
        for totals, model in zip(grouped, partials):
            totals[:] = [add_groups(t, q) for t, q in zip(totals, model)]
    result.sums = [
        [math.fsum(x for p in parts for x in p[m][q]) for q in range(len(parts[0][m]))]
        for m in range(len(parts[0]) if parts else 0)
    ]
    result.grouped = [[t for t in model if t is not None] for model in grouped]
    return result


def _finds_anything(found: tuple[Any, ...]) -> bool:
    """Whether a block's statistics hold any quantity (sums, keep bits, groups, peaks)."""
    sums, kept, _, grouped, peaks = found
    quantities = [*sums, *grouped, *peaks]
    return any(len(q) for q in quantities) or any(k is not None for k in kept)


class _BitStore:
    """Keep bits of every block of a tensor in one allocation per model, made before the
    blocks' temporaries: small buffers left among freed temporaries pin them in the heap.
    Pages never written cost nothing."""

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
    ranked: list[list[Selection]] | None = None
    sums: list[list[float]] | None = None
    kept: list[torch.Tensor | None] | None = None
    inputs_checked: bool = False
    grouped: list[list[torch.Tensor]] | None = None
    priors: tuple[Totals, ...] = ()
    derived: Any = None

    def facts(self, offset: int) -> TensorFacts:
        """What the method of the block starting at flat index `offset` receives."""
        return TensorFacts(
            selections=self.selections or (),
            ranked=self.ranked or (),
            sums=self.sums or (),
            kept=self.kept or (),
            offset=offset,
            grouped=self.grouped or (),
            priors=self.priors,
            derived=self.derived,
        )


class StatsCache:
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

    def get(self, job: Job) -> BlockStats | None:
        method = self.plan.method
        if not method.needs_facts or job.rows is None or job.tensor.copy:
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
        # results are taken in order as they come, not gathered: gathered, every block's
        # histograms of a big tensor would be held at once
        return serial(fn, items) if self.pool is None else self.pool.map(fn, items)

    def _compute(self, tensor: TensorPlan) -> dict[tuple[int, int] | None, BlockStats]:
        with self.reader.keeping_folds(tensor.name):
            found = self._found(tensor)
        derive = self.plan.method.derive
        if derive is None or not found:
            return found
        first = next(iter(found.values())).facts(0)
        derived = derive(tensor.params, tuple(tensor.shape), first)
        return {rows: replace(stats, derived=derived) for rows, stats in found.items()}

    def _found(self, tensor: TensorPlan) -> dict[tuple[int, int] | None, BlockStats]:
        blocks = row_blocks(self.plan, tensor, self.block_elements)
        method = self.plan.method
        chosen = (
            block_selections(self.plan, tensor, self.reader, blocks, self._map)
            if method.topk
            else {}
        )
        priors: list[Totals] = []
        for stage in method.priors:  # the first reads every input through the check
            found = block_sums(
                self.plan,
                tensor,
                self.reader,
                blocks,
                self._map,
                stage=stage,
                priors=priors,
                check=not priors,
            )
            priors.append(Totals(found.sums, found.peaks))
        ranked = (
            block_ranked(self.plan, tensor, self.reader, blocks, self._map, priors)
            if method.score
            else {}
        )
        without_sums = {  # the merge pass checks inputs no earlier pass read
            rows: BlockStats(
                chosen.get(rows),
                ranked.get(rows),
                inputs_checked=bool(priors),
                priors=tuple(priors),
            )
            for rows in blocks
        }
        if method.sums is None:
            return without_sums
        keep = input_cache_bytes(self.plan, tensor, self.block_elements) > 0
        found = block_sums(
            self.plan,
            tensor,
            self.reader,
            blocks,
            self._map,
            keep,
            ranked,
            priors=priors,
            check=not priors,
        )
        if found.empty:
            return without_sums
        if keep:
            with self.lock:
                self.inputs.update(
                    ((tensor.name, rows), loaded)
                    for rows, loaded in zip(blocks, found.inputs)
                    if loaded is not None
                )
        return {  # `block_sums` read every input of every block through the check
            rows: BlockStats(
                chosen.get(rows),
                ranked.get(rows),
                found.sums,
                found.kept[j] or None,
                inputs_checked=True,
                grouped=found.grouped,
                priors=tuple(priors),
            )
            for j, rows in enumerate(blocks)
        }

    def take_inputs(self, job: Job) -> list[torch.Tensor] | None:
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
