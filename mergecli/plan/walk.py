"""The output's tensors in order: before the layers, the main stack group by group (layers
renumbered), after the layers, then the layers of other stacks name for name."""

from __future__ import annotations

from dataclasses import replace

from mergecli.errors import Problem
from mergecli.model.layers import is_pre_layer, layer_counts, split_layer
from mergecli.model.modules import module_names, module_of
from mergecli.plan.context import Context, Findings
from mergecli.plan.groups import Group
from mergecli.plan.tensors import plan_tensor
from mergecli.plan.types import Section, TensorPlan

LayerSource = tuple[int, int]  # (model, layer index) an output layer is made from


def plan_all(ctx: Context, found: Findings) -> tuple[list[TensorPlan], list[LayerSource]]:
    """Every output tensor's plan, and where each output layer of the main stack comes from:
    the whole model at once, or module by module in the order of `modules:`."""
    names = list(ctx.inputs.models[ctx.inputs.template].tensors)
    modules = ctx.inputs.recipe.modules
    if ctx.inputs.recipe.tensor_names in ("intersection", "union"):
        return _plan_by_name(ctx, found, ctx.groups[0], ctx.inputs.recipe.tensor_names), []
    if not modules:
        return _plan_part(ctx, found, names, ctx.groups, main=True)
    found_modules = module_names(names)
    stack = ctx.inputs.stack
    main = module_of(f"{stack}.0.x", found_modules) if stack else None
    out: list[TensorPlan] = []
    sources: list[LayerSource] = []
    for module in modules:
        part = [n for n in names if module_of(n, found_modules) == module]
        groups = tuple(g for g in ctx.groups if g.module == module)
        planned, layer_sources = _plan_part(ctx, found, part, groups, main=module == main)
        out += planned
        sources += layer_sources
    return out, sources


def _plan_part(
    ctx: Context, found: Findings, names: list[str], groups: tuple[Group, ...], main: bool
) -> tuple[list[TensorPlan], list[LayerSource]]:
    """The tensors `names` of the template: before the layers, the main stack group by group
    (only when `main`: this part holds it), after the layers, then other stacks' layers."""
    tying = ctx.tying
    template = ctx.inputs.models[ctx.inputs.template]
    outside = [n for n in names if split_layer(n) is None]
    pre = [n for n in outside if is_pre_layer(n)]
    post = [n for n in outside if not is_pre_layer(n)]
    post = [n for n in post if n not in tying.heads or not tying.out_tied]
    if main and not tying.out_tied:
        post += [h for h in tying.heads if h not in template.tensors]
    first, last = groups[0], groups[-1]
    out: list[TensorPlan] = []
    for name in pre:
        out += plan_tensor(ctx, found, name, first, [name] * len(first.sources), "pre", None, 0.0)
    layers, sources = _plan_layers(ctx, found, groups) if main else ([], [])
    out += layers
    for name in post:
        out += plan_tensor(ctx, found, name, last, [name] * len(last.sources), "post", None, 0.0)
    stack = ctx.inputs.stack if main else None
    out += _plan_other_stacks(ctx, found, first, names, stack)
    return out, sources


def _plan_by_name(ctx: Context, found: Findings, group: Group, mode: str) -> list[TensorPlan]:
    """The models form over the tensor names every model holds (`intersection`) or any model
    holds (`union`: a tensor is merged over the models that hold it), name for name."""
    models = ctx.inputs.models
    held = [set(models[s.model].tensors) for s in group.sources]
    ordered = list(dict.fromkeys(n for s in group.sources for n in models[s.model].tensors))
    names = [n for n in ordered if all(n in h for h in held)] if mode == "intersection" else ordered
    counts = layer_counts(names)
    out: list[TensorPlan] = []
    for name in names:
        sources = tuple(s for s, h in zip(group.sources, held) if name in h)
        base = group.base
        if base is not None and ctx.inputs.spec.uses_base and name not in models[base].tensors:
            found.add(_missing_in_base(ctx, name, base))
            continue
        spec = ctx.inputs.spec
        merged = [s for s in sources if not (spec.uses_base and s.model == base)]
        if len(merged) < spec.min_models:
            found.add(_too_few(ctx, name, len(merged)))
            continue
        split = split_layer(name)
        if split is None:
            section: Section = "pre" if is_pre_layer(name) else "post"
            layer, t = None, 0.0
        else:
            depth = counts[split.stack]
            section, layer = "layer", split.index
            t = split.index / (depth - 1) if depth > 1 else 1.0
        part = replace(group, sources=sources)
        out += plan_tensor(ctx, found, name, part, [name] * len(sources), section, layer, t)
    return out


def _missing_in_base(ctx: Context, name: str, base: int) -> Problem:
    return Problem(
        "tensor_names",
        f"tensor `{name}` is in some models but not in the base {ctx.inputs.models[base].label}",
        "a task vector needs the base's tensor; use `tensor_names: intersection`",
        code=4,
    )


def _too_few(ctx: Context, name: str, count: int) -> Problem:
    spec = ctx.inputs.spec
    return Problem(
        "tensor_names",
        f"tensor `{name}` is held by {count} of the models; `{spec.name}` merges at least "
        f"{spec.min_models}",
        "use `tensor_names: intersection`",
        code=4,
    )


def _plan_layers(
    ctx: Context, found: Findings, groups: tuple[Group, ...]
) -> tuple[list[TensorPlan], list[LayerSource]]:
    out: list[TensorPlan] = []
    sources: list[LayerSource] = []
    for group in groups:
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


def _plan_other_stacks(
    ctx: Context, found: Findings, group: Group, names: list[str], main_stack: str | None
) -> list[TensorPlan]:
    """Layer tensors of `names` outside `main_stack` (a T5 encoder, a vision tower): merged
    name for name over the sources of the first group; slices only reshape the main stack."""
    template = ctx.inputs.models[ctx.inputs.template]
    counts = layer_counts(list(template.tensors))
    out: list[TensorPlan] = []
    for name in names:
        split = split_layer(name)
        if split is None or split.stack == main_stack:
            continue
        depth = counts[split.stack]
        t = split.index / (depth - 1) if depth > 1 else 1.0
        names = [name] * len(group.sources)
        out += plan_tensor(ctx, found, name, group, names, "layer", split.index, t)
    return out
