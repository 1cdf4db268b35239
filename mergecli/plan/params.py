"""Resolve a parameter for one tensor: model or slice source, slice, top level, default."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from mergecli.errors import Problem
from mergecli.io.jsonfile import read_json
from mergecli.plan.context import Context, Findings
from mergecli.plan.groups import Group, Source
from mergecli.plan.inputs import Inputs
from mergecli.recipe.settings import Parameters, evaluate

Resolved = tuple[dict[str, Any], tuple[dict[str, Any], ...]]


def lookup(name: str, tensor: str, t: float, blocks: Sequence[Parameters | None]) -> Any:
    """The first value of `name` in `blocks` that applies to `tensor` at `t`."""
    for block in blocks:
        if block is not None and name in block:
            value = evaluate(block[name], tensor, t)
            if value is not None:
                return value
    return None


def unresolved(param: str, tensor: str, where: str) -> Problem:
    """The problem of a parameter with no value for a tensor."""
    return Problem(
        where,
        f"parameter `{param}` has no value for tensor `{tensor}` (no filter condition matched)",
        "add a catch-all condition without `filter` (e.g. `- value: 1.0`)",
    )


def prepare_params(
    inputs: Inputs, groups: Sequence[Group]
) -> tuple[dict[int, dict[str, Any]], list[Problem]]:
    """Per-model parameters a method derives from files (e.g. mwa's trainer_state.json)."""
    spec = inputs.spec
    if spec.prepare is None or spec.reads is None:
        return {}, []
    sources = [s for g in groups for s in g.sources]
    states = [_read_state(inputs, s.model, spec.reads) for s in sources]
    params = {}
    for param in spec.scoped("global"):
        value = lookup(param.name, "", 0.0, [inputs.recipe.parameters])
        params[param.name] = param.default if value is None else value
    try:
        prepared = spec.prepare(states, params)
    except ValueError as exc:
        return {}, [Problem("models", str(exc), f"each input needs a {spec.reads}", code=4)]
    return {s.model: values for s, values in zip(sources, prepared)}, []


def _read_state(inputs: Inputs, model: int, filename: str) -> dict[str, Any] | None:
    source = inputs.models[model].source
    if filename not in source.files():
        return None
    data = read_json(source.local(filename), inputs.models[model].label)
    return data if isinstance(data, dict) else None


def resolve_params(
    ctx: Context,
    found: Findings,
    out_name: str,
    group: Group,
    picked: Sequence[tuple[Source, str]],
    t: float,
) -> Resolved | None:
    """Method-wide and per-model parameters of one output tensor (None when any required
    one has no value or the method's check refuses them; the problems go to `found`)."""
    spec = ctx.inputs.spec
    top = ctx.inputs.recipe.parameters
    params: dict[str, Any] = {}
    ok = True
    for param in spec.scoped("global"):
        value = _value(
            param.name, param.default, out_name, t, [group.params, group.module_params, top]
        )
        if value is None and param.required:
            ok = False
            found.problems.append(unresolved(param.name, out_name, "parameters"))
        params[param.name] = value
    per_model = []
    for source, name in picked:
        values, complete = _model_values(ctx, found, out_name, name, group, source, t)
        ok = ok and complete
        per_model.append(values)
        if ok and spec.check is not None:
            message = spec.check(params, values)
            if message:
                found.add(Problem(f"{source.where}.parameters", message, ""))
            ok = not message
    return (params, tuple(per_model)) if ok else None


def _value(
    name: str, default: Any, tensor: str, t: float, blocks: Sequence[Parameters | None]
) -> Any:
    value = lookup(name, tensor, t, blocks)
    return default if value is None else value


def _model_values(
    ctx: Context,
    found: Findings,
    out_name: str,
    name: str,
    group: Group,
    source: Source,
    t: float,
) -> tuple[dict[str, Any], bool]:
    prepared: Mapping[str, Any] = ctx.prepared.get(source.model, {})
    values: dict[str, Any] = dict(prepared)
    blocks = [source.params, group.params, group.module_params, ctx.inputs.recipe.parameters]
    complete = True
    for param in ctx.inputs.spec.scoped("model"):
        if param.name in values:
            continue
        value = _value(param.name, param.default, name, t, blocks)
        if value is None and param.required:
            complete = False
            found.problems.append(unresolved(param.name, out_name, f"{source.where}.parameters"))
        values[param.name] = value
    return values, complete
