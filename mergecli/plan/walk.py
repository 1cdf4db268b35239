"""The output's tensors in order: before the layers, the main stack group by group (layers
renumbered), after the layers, then the layers of other stacks name for name."""

from __future__ import annotations

from mergecli.model.layers import is_pre_layer, layer_counts, split_layer
from mergecli.plan.context import Context, Findings
from mergecli.plan.groups import Group
from mergecli.plan.tensors import plan_tensor
from mergecli.plan.types import TensorPlan

LayerSource = tuple[int, int]  # (model, layer index) an output layer is made from


def plan_all(ctx: Context, found: Findings) -> tuple[list[TensorPlan], list[LayerSource]]:
    """Every output tensor's plan, and where each output layer of the main stack comes from."""
    inputs, tying, groups = ctx.inputs, ctx.tying, ctx.groups
    template = inputs.models[inputs.template]
    outside = [n for n in template.tensors if split_layer(n) is None]
    pre = [n for n in outside if is_pre_layer(n)]
    post = [n for n in outside if not is_pre_layer(n)]
    post = [n for n in post if n not in tying.heads or not tying.out_tied]
    if not tying.out_tied:
        post += [h for h in tying.heads if h not in template.tensors]
    first, last = groups[0], groups[-1]
    out: list[TensorPlan] = []
    for name in pre:
        out += plan_tensor(ctx, found, name, first, [name] * len(first.sources), "pre", None, 0.0)
    layers, sources = _plan_layers(ctx, found)
    out += layers
    for name in post:
        out += plan_tensor(ctx, found, name, last, [name] * len(last.sources), "post", None, 0.0)
    out += _plan_other_stacks(ctx, found, first)
    return out, sources


def _plan_layers(ctx: Context, found: Findings) -> tuple[list[TensorPlan], list[LayerSource]]:
    out: list[TensorPlan] = []
    sources: list[LayerSource] = []
    for group in ctx.groups:
        for k in range(group.length):
            out += _plan_layer(ctx, found, group, k, len(sources))
            sources.append((group.sources[0].model, group.sources[0].start + k))
    return out, sources


def _plan_layer(
    ctx: Context, found: Findings, group: Group, k: int, out_layer: int
) -> list[TensorPlan]:
    """Output layer `out_layer`: layer k of `group` (each source's start + k)."""
    t = k / (group.length - 1) if group.length > 1 else 1.0
    stacks = ctx.inputs.main_stacks
    first = group.sources[0]
    out: list[TensorPlan] = []
    for rest in ctx.inputs.layers[first.model].get(first.start + k, ()):
        names = [f"{stacks[s.model]}.{s.start + k}.{rest}" for s in group.sources]
        out_name = f"{ctx.inputs.stack}.{out_layer}.{rest}"
        out += plan_tensor(ctx, found, out_name, group, names, "layer", out_layer, t)
    return out


def _plan_other_stacks(ctx: Context, found: Findings, group: Group) -> list[TensorPlan]:
    """Layer tensors of secondary stacks (a T5 encoder, a vision tower): merged name for
    name over the sources of the first group; slices only reshape the main stack."""
    template = ctx.inputs.models[ctx.inputs.template]
    counts = layer_counts(list(template.tensors))
    out: list[TensorPlan] = []
    for name in template.tensors:
        split = split_layer(name)
        if split is None or split.stack == ctx.inputs.stack:
            continue
        depth = counts[split.stack]
        t = split.index / (depth - 1) if depth > 1 else 1.0
        names = [name] * len(group.sources)
        out += plan_tensor(ctx, found, name, group, names, "layer", split.index, t)
    return out
