"""Checks that need the method registry: names, scopes, types, ranges, required values.

Each check returns `Problem`s (never raises) so that every mistake is reported at once.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mergecli import methods
from mergecli.errors import Problem
from mergecli.methods.spec import MethodSpec
from mergecli.recipe.parts import base_joins, parts
from mergecli.recipe.refs import dicts, raw_parts
from mergecli.recipe.schema import InputModel, InputSlice, ModelRef, OutputSlice, Recipe
from mergecli.recipe.settings import Parameters, leaf_values
from mergecli.recipe.suggest import closest


def check_recipe(recipe: Recipe) -> list[Problem]:
    """Every semantic problem in a schema-valid recipe."""
    spec = methods.get(recipe.merge_method)
    if spec is None:
        return [_unknown_method(recipe.merge_method), *_check_unsupported(recipe)]
    problems = list(_check_unsupported(recipe))
    data = recipe.model_dump()
    restated = _restated(data, spec)
    blocks = _parameter_blocks(data)
    problems += [p for p in _check_parameter_blocks(blocks, spec) if p.where not in restated]
    problems += _check_inputs(recipe, spec)
    problems += _check_slices(recipe)
    problems += _check_output(recipe)
    if recipe.post is not None and recipe.post.lines is not None and not spec.uses_base:
        problems.append(
            Problem(
                "post.lines",
                f"LiNeS scales task vectors, but method `{spec.name}` takes no base model",
                "use a task-vector method (task_arithmetic, ties, dare_ties, ...) with a `base_model`",
            )
        )
    return problems


_PRUNING = ("ties", "dare_linear", "dare_ties", "magnitude_prune")


def _check_output(recipe: Recipe) -> list[Problem]:
    """An adapter output needs adapters of one base (`base_model`, `models:`), and either a
    PEFT combination (weighted as `task_arithmetic`) or the rank to factor a merge to."""
    out = recipe.output
    if out is None:
        return []
    if out.kind == "model":
        extra = [
            k for k in ("combination", "svd_rank", "rank", "density") if getattr(out, k) is not None
        ]
        return [
            Problem(
                f"output.{k}",
                f"`{k}` applies to `kind: adapter` only",
                "set `kind: adapter` or remove it",
            )
            for k in extra
        ]
    problems = []
    if recipe.base_model is None or not recipe.models:
        problems.append(
            Problem(
                "output.kind",
                "an adapter output needs `base_model` and `models:` (adapters of that base)",
                "list the adapters under `models:` and their base as `base_model`",
            )
        )
    combination = out.combination
    if (combination is None) == (out.rank is None):
        problems.append(
            Problem(
                "output",
                "give exactly one of `combination` (a PEFT combination type) and `rank` (factor the merged model to this rank)",
                "e.g. `{kind: adapter, combination: ties_svd, svd_rank: 16, density: 0.5}` or `{kind: adapter, rank: 16}`",
            )
        )
    if combination is not None and recipe.merge_method != "task_arithmetic":
        problems.append(
            Problem(
                "merge_method",
                f"with `output.combination`, PEFT's `{combination}` merges the adapters; `{recipe.merge_method}` would not be used",
                "write `merge_method: task_arithmetic` (its per-model `weight` is PEFT's weights)",
            )
        )
    if (
        combination is not None
        and combination.removesuffix("_svd") in _PRUNING
        and out.density is None
    ):
        problems.append(
            Problem(
                "output.density",
                f"combination `{combination}` needs a `density`",
                "e.g. `density: 0.5`",
            )
        )
    if out.svd_rank is not None and (combination is None or not combination.endswith("svd")):
        problems.append(
            Problem(
                "output.svd_rank",
                "`svd_rank` applies to the `*svd` combinations only",
                "use `svd`, `ties_svd`, ...; or remove it",
            )
        )
    if out.density is not None and (
        combination is None or combination.removesuffix("_svd") not in _PRUNING
    ):
        problems.append(
            Problem(
                "output.density",
                "`density` applies to ties, dare and magnitude_prune combinations only",
                "remove it, or set per-model `density` for the method",
            )
        )
    return problems


def _unknown_method(name: str) -> Problem:
    match = closest(name, methods.names())
    hint = f"did you mean `{match}`? " if match else ""
    return Problem(
        "merge_method",
        f"unknown merge method `{name}`",
        f"{hint}`mergecli methods` lists them: {', '.join(methods.names())}",
    )


def _check_unsupported(recipe: Recipe) -> Iterator[Problem]:
    for part in parts(recipe):
        for i, out_slice in enumerate(part.slices or []):
            if out_slice.residual_weight is not None:
                yield Problem(
                    f"{part.prefix}slices[{i}].residual_weight",
                    "`residual_weight` is not supported yet",
                    "remove it",
                )


def recipe_warnings(recipe: Recipe) -> list[Problem]:
    """Keys of a valid recipe that mergekit ignores and that change nothing here either (a
    restated default, a memory flag): each is a warning, not an error; `--strict` refuses
    them."""
    spec = methods.get(recipe.merge_method)
    if spec is None:
        return []
    return list(_restated(recipe.model_dump(), spec).values())


def _restated(data: Mapping[str, Any], spec: MethodSpec) -> dict[str, Problem]:
    """Per recipe path: the warning for a parameter `spec` does not take whose every value
    in the recipe restates what the method does anyway."""
    places: dict[str, list[tuple[str, Any]]] = {}
    for path, block, _ in _parameter_blocks(data):
        for name, setting in block.items():
            if spec.param(name) is None:
                places.setdefault(name, []).append((f"{path}.{name}", setting))
    found: dict[str, Problem] = {}
    for name, where in places.items():
        values = [v for _, setting in where for v in leaf_values(setting)]
        reason = _restates(spec, name, values)
        if reason is None:
            continue
        for path, _ in where:
            found[path] = Problem(
                path,
                f"`{spec.name}` takes no `{name}` ({reason}); ignored, as mergekit ignores it",
                "remove it (`--strict` refuses keys that change nothing)",
            )
    return found


def _restates(spec: MethodSpec, name: str, values: list[Any]) -> str | None:
    """Why `name` with these values changes nothing for `spec`, or None when it would."""
    if not values:
        return None
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    if name == "int8_mask" and all(isinstance(v, bool) for v in values):
        return "a memory option of mergekit's; mergecli's selection is exact without it"
    if name == "density" and numbers and all(v == 1 for v in values):
        return f"`{spec.name}` keeps every entry; density 1 restates that"
    if name == "lambda" and numbers and all(v == 1 for v in values):
        return f"`{spec.name}` does not scale its result; lambda 1 restates that"
    if name == "normalize" and spec.name in _NORMALIZING and all(v is True for v in values):
        return f"`{spec.name}` always normalizes its weights"
    if name == "weight" and spec.param("weight") is None and numbers and len(set(values)) == 1:
        return f"`{spec.name}` treats its models alike; equal weights restate that"
    return None


_NORMALIZING = ("multislerp", "nuslerp")


def check_raw(data: Mapping[str, Any]) -> list[Problem]:
    """Method and parameter-name problems of a recipe that failed schema validation.

    Run on the raw YAML data so that these mistakes are reported together with the schema's.
    """
    name = data.get("merge_method")
    if not isinstance(name, str):
        return []
    spec = methods.get(name)
    if spec is None:
        return [_unknown_method(name)]
    return list(_check_parameter_blocks(_parameter_blocks(data), spec))


def _parameter_blocks(data: Mapping[str, Any]) -> Iterator[tuple[str, Mapping[str, Any], bool]]:
    """(path, parameters, may hold method-wide parameters) for every block in raw data."""

    def block(owner: Mapping[str, Any]) -> Mapping[str, Any]:
        params = owner.get("parameters")
        return params if isinstance(params, Mapping) else {}

    yield "parameters", block(data), True
    for at, part in raw_parts(data):
        if at:
            yield f"{at}parameters", block(part), True
        for i, model in enumerate(dicts(part.get("models"))):
            yield f"{at}models[{i}].parameters", block(model), False
        for i, out_slice in enumerate(dicts(part.get("slices"))):
            yield f"{at}slices[{i}].parameters", block(out_slice), True
            for j, source in enumerate(dicts(out_slice.get("sources"))):
                yield f"{at}slices[{i}].sources[{j}].parameters", block(source), False


def _check_parameter_blocks(
    blocks: Iterator[tuple[str, Mapping[str, Any], bool]], spec: MethodSpec
) -> Iterator[Problem]:
    known = [p.name for p in spec.params]
    for path, block, global_ok in blocks:
        for name, setting in block.items():
            param = spec.param(name)
            if param is None:
                match = closest(name, known)
                takes = ", ".join(f"`{k}`" for k in known) or "no parameters"
                yield Problem(
                    f"{path}.{name}",
                    f"unknown parameter `{name}` for method `{spec.name}`"
                    + (f"; did you mean `{match}`?" if match else ""),
                    f"`{spec.name}` takes {takes} (see `mergecli methods {spec.name}`)",
                )
                continue
            if param.scope == "global" and not global_ok:
                yield Problem(
                    f"{path}.{name}",
                    f"`{name}` is a method-wide parameter of `{spec.name}` and has no effect "
                    "on one model",
                    "move it to the top-level `parameters:` (or a slice's `parameters:`)",
                )
                continue
            for value in leaf_values(setting):
                message = param.check(value)
                if message:
                    yield Problem(f"{path}.{name}", message, param.description)
                    break


@dataclass(frozen=True)
class _InputGroup:
    """One output group as the checks see it: its path, inputs, base and the parameter
    blocks above its models (slice, module)."""

    where: str
    inputs: Sequence[tuple[str, InputModel | InputSlice]]
    base: ModelRef | None
    blocks: Sequence[Parameters | None]


def _input_groups(recipe: Recipe) -> Iterator[_InputGroup]:
    for part in parts(recipe):
        at = part.prefix
        if part.models:
            models: list[tuple[str, InputModel | InputSlice]] = [
                (f"{at}models[{i}]", m) for i, m in enumerate(part.models)
            ]
            base = recipe.base_model
            if (
                base is not None
                and base_joins(recipe)
                and base not in {m.model for m in part.models}
            ):
                models.append(
                    ("base_model", InputModel.model_construct(model=base, parameters=None))
                )
            yield _InputGroup(f"{at}models", models, recipe.base_model, [part.params])
        for i, sl in enumerate(part.slices or []):
            sources = [(f"{at}slices[{i}].sources[{j}]", s) for j, s in enumerate(sl.sources)]
            base = sl.base_model or recipe.base_model
            blocks = [sl.parameters, part.params]
            yield _InputGroup(f"{at}slices[{i}].sources", sources, base, blocks)


def _has_value(name: str, blocks: Sequence[Mapping[str, Any] | None]) -> bool:
    return any(block is not None and name in block for block in blocks)


def _check_inputs(recipe: Recipe, spec: MethodSpec) -> Iterator[Problem]:
    for group in _input_groups(recipe):
        base = group.base
        if spec.needs_base and base is None:
            yield Problem(
                "base_model",
                f"method `{spec.name}` needs a `base_model` (task vectors are taken against it)",
                "add `base_model: <the model the others were fine-tuned from>`",
            )
        others = [(p, m) for p, m in group.inputs if not (spec.uses_base and m.model == base)]
        count = len(others)
        if count < spec.min_models or (spec.max_models is not None and count > spec.max_models):
            yield Problem(group.where, _count_message(spec, count), _count_hint(spec))
        above = [*group.blocks, recipe.parameters]
        for path, model in others:
            for param in spec.scoped("model"):
                if param.required and not _has_value(param.name, [model.parameters, *above]):
                    if path == "base_model":
                        yield _base_without(spec, param.name)
                        continue
                    yield Problem(
                        f"{path}.parameters",
                        f"missing required parameter `{param.name}` for model `{model.model}`",
                        f"set `{param.name}` under this model's `parameters:` or once in the "
                        "top-level `parameters:`",
                    )
        for param in spec.scoped("global"):
            if param.required and not _has_value(param.name, above):
                yield Problem(
                    "parameters",
                    f"missing required parameter `{param.name}` for method `{spec.name}`",
                    f"add `parameters: {{{param.name}: ...}}` ({param.description})",
                )


def _base_without(spec: MethodSpec, name: str) -> Problem:
    return Problem(
        "base_model",
        f"`{spec.name}` merges the base_model as one more model (as mergekit does), "
        f"and it has no `{name}`",
        f"set `{name}` in the top-level `parameters:`, list the base under `models:` with "
        f"its `{name}`, or remove `base_model` (`{spec.name}` does not need one)",
    )


def _count_message(spec: MethodSpec, count: int) -> str:
    what = "models besides the base" if spec.uses_base else "input models"
    return f"method `{spec.name}` got {count} {what}"


def _count_hint(spec: MethodSpec) -> str:
    if spec.max_models == spec.min_models:
        need = f"exactly {spec.min_models}"
    elif spec.max_models is None:
        need = f"at least {spec.min_models}"
    else:
        need = f"{spec.min_models} to {spec.max_models}"
    return f"it takes {need}; {spec.count_hint}" if spec.count_hint else f"it takes {need}"


def _check_slices(recipe: Recipe) -> Iterator[Problem]:
    for part in parts(recipe):
        for i, out_slice in enumerate(part.slices or []):
            yield from _check_slice(f"{part.prefix}slices[{i}]", out_slice)


def _check_slice(at: str, out_slice: OutputSlice) -> Iterator[Problem]:
    lengths = []
    for j, source in enumerate(out_slice.sources):
        start, end = source.layer_range
        path = f"{at}.sources[{j}].layer_range"
        if start < 0:
            yield Problem(
                path, f"layer_range [{start}, {end}] starts below 0", "layers count from 0"
            )
        elif end <= start:
            yield Problem(
                path,
                f"layer_range [{start}, {end}] is empty (the end is exclusive)",
                f"to take layer {start} alone write [{start}, {start + 1}]",
            )
        lengths.append((j, end - start, source.layer_range))
    if lengths and len({n for _, n, _ in lengths}) > 1:
        j0, n0, r0 = lengths[0]
        for j, n, rng in lengths[1:]:
            if n != n0:
                yield Problem(
                    f"{at}.sources[{j}].layer_range",
                    f"covers {n} layers {list(rng)} but sources[{j0}] covers {n0} {list(r0)}",
                    "all sources of one slice must cover the same number of layers",
                )
