"""Whole-tensor facts of tensors held whole in memory (the engine finds the same facts
over row blocks, `engine.stats`); equal to them bit for bit."""

from __future__ import annotations

from dataclasses import replace

import torch

from mergecli.methods.kernels.selection import Selection
from mergecli.methods.kernels.sums import add_groups, exact_total, largest
from mergecli.methods.kernels.topk import select_top
from mergecli.methods.spec import BlockSums, MergeArgs, MethodSpec, TensorFacts, Totals


def whole_facts(spec: MethodSpec, args: MergeArgs) -> TensorFacts:
    """The facts `spec` asks for (`topk`, `priors`, `score`, `sums`) over `args`' whole
    tensors."""
    selections: list[list[Selection]] = []
    if spec.topk is not None:
        assert args.base is not None, "top-k methods select task-vector entries"
        numel = args.base.numel()
        for tensor, model in zip(args.tensors, args.per_model):
            counts = spec.topk(args.params, model, numel)
            magnitude = (tensor - args.base).abs_() if counts else torch.empty(0)
            selections.append([select_top(magnitude, k) for k in counts])
    priors: list[Totals] = []
    for stage in spec.priors:
        found = stage(replace(args, facts=TensorFacts(priors=tuple(priors))))
        priors.append(totals(found))
    ranked: list[list[Selection]] = []
    if spec.score is not None and spec.score_topk is not None:
        counts = spec.score_topk(args.params, args.tensors[0].numel())
        scores = spec.score(replace(args, facts=TensorFacts(priors=priors))) if counts else []
        ranked = [[select_top(score, k) for k in counts] for score in scores]
    chosen = TensorFacts(selections=selections, ranked=ranked, priors=priors)
    if spec.sums is not None:
        found = spec.sums(replace(args, facts=chosen))
        grouped = [[add_groups(None, q) for q in model] for model in found.grouped]
        chosen = replace(chosen, sums=totals(found).sums, kept=found.kept, grouped=grouped)
    if spec.derive is not None:
        chosen = replace(chosen, derived=spec.derive(args.params, args.shape, chosen))
    return chosen


def totals(found: BlockSums) -> Totals:
    """A whole tensor's sums (added exactly) and maxima from its statistics."""
    return Totals(
        sums=[[exact_total([rows]) for rows in model] for model in found.sums],
        peaks=[[largest(rows) for rows in model] for model in found.peaks],
    )


def apply(spec: MethodSpec, args: MergeArgs) -> torch.Tensor:
    """`spec`'s method on `args`, with the whole-tensor facts it needs computed first when
    `args` holds whole tensors and no facts."""
    if args.facts is None and spec.needs_facts:
        args = replace(args, facts=whole_facts(spec, args))
    return spec.fn(args)
