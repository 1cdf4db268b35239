"""Whole-tensor facts of tensors held whole in memory (the engine finds the same facts
over row blocks, `engine.stats`); equal to them bit for bit."""

from __future__ import annotations

from dataclasses import replace

import torch

from mergecli.methods.kernels.selection import Selection
from mergecli.methods.kernels.sums import add_groups, exact_total
from mergecli.methods.kernels.topk import select_top
from mergecli.methods.spec import MergeArgs, MethodSpec, TensorFacts


def whole_facts(spec: MethodSpec, args: MergeArgs) -> TensorFacts:
    """The facts `spec` asks for (`topk`, `score`, `sums`) over `args`' whole tensors."""
    selections: list[list[Selection]] = []
    if spec.topk is not None:
        assert args.base is not None, "top-k methods select task-vector entries"
        numel = args.base.numel()
        for tensor, model in zip(args.tensors, args.per_model):
            counts = spec.topk(args.params, model, numel)
            magnitude = (tensor - args.base).abs_() if counts else torch.empty(0)
            selections.append([select_top(magnitude, k) for k in counts])
    ranked: list[Selection] = []
    if spec.score is not None and spec.score_topk is not None:
        counts = spec.score_topk(args.params, args.tensors[0].numel())
        score = spec.score(args) if counts else torch.empty(0)
        ranked = [select_top(score, k) for k in counts]
    chosen = TensorFacts(selections=selections, ranked=ranked)
    if spec.sums is None:
        return chosen
    found = spec.sums(replace(args, facts=chosen))
    sums = [[exact_total([rows]) for rows in model] for model in found.sums]
    grouped = [[add_groups(None, q) for q in model] for model in found.grouped]
    return replace(chosen, sums=sums, kept=found.kept, grouped=grouped)


def apply(spec: MethodSpec, args: MergeArgs) -> torch.Tensor:
    """`spec`'s method on `args`, with the whole-tensor facts it needs computed first when
    `args` holds whole tensors and no facts."""
    if args.facts is None and (spec.topk or spec.score or spec.sums):
        args = replace(args, facts=whole_facts(spec, args))
    return spec.fn(args)
