"""Output groups: the `models:` form is one group over every layer, each slice is one;
in the `modules:` form each module has its own."""

from __future__ import annotations

from dataclasses import dataclass

from mergecli.errors import Problem
from mergecli.plan.inputs import Inputs, depth_of
from mergecli.recipe.parts import Part, base_joins, parts
from mergecli.recipe.schema import InputSlice
from mergecli.recipe.settings import Parameters


@dataclass(frozen=True)
class Source:
    """One input of an output group: model index, first layer, its parameter block."""

    model: int
    start: int
    params: Parameters | None
    where: str


@dataclass(frozen=True)
class Group:
    """An output slice (the models form is one group covering every layer); `module` is the
    module of `modules:` it belongs to (None: the whole model) with that module's
    `parameters:` in `module_params`."""

    sources: tuple[Source, ...]
    length: int
    params: Parameters | None
    base: int | None
    where: str
    module: str | None = None
    module_params: Parameters | None = None


def plan_groups(inputs: Inputs) -> tuple[list[Group], list[Problem]]:
    """The output's groups, and every layer range that is out of bounds."""
    groups: list[Group] = []
    problems: list[Problem] = []
    for part in parts(inputs.recipe):
        part_groups, part_problems = _part_groups(inputs, part)
        groups += part_groups
        problems += part_problems
    return groups, problems


def _part_groups(inputs: Inputs, part: Part) -> tuple[list[Group], list[Problem]]:
    recipe, at = inputs.recipe, part.prefix
    if part.models:
        sources = [
            Source(inputs.index(m.model), 0, m.parameters, f"{at}models[{i}]")
            for i, m in enumerate(part.models)
        ]
        base = inputs.index(recipe.base_model) if recipe.base_model else None
        if base is not None and base_joins(recipe) and base not in {s.model for s in sources}:
            sources.append(Source(base, 0, None, "base_model"))
        group = Group(
            tuple(sources), inputs.depth, None, base, f"{at}models", part.module, part.params
        )
        return [group], []
    groups, problems = [], []
    for i, out_slice in enumerate(part.slices or []):
        sources = [
            Source(
                inputs.index(s.model),
                s.layer_range[0],
                s.parameters,
                f"{at}slices[{i}].sources[{j}]",
            )
            for j, s in enumerate(out_slice.sources)
        ]
        base_ref = out_slice.base_model or recipe.base_model
        first = out_slice.sources[0].layer_range
        groups.append(
            Group(
                sources=tuple(sources),
                length=first[1] - first[0],
                params=out_slice.parameters,
                base=inputs.index(base_ref) if base_ref else None,
                where=f"{at}slices[{i}]",
                module=part.module,
                module_params=part.params,
            )
        )
        problems += [
            _out_of_bounds(inputs, f"{at}slices[{i}].sources[{j}]", s)
            for j, s in enumerate(out_slice.sources)
        ]
    return groups, [p for p in problems if p is not None]


def _out_of_bounds(inputs: Inputs, where: str, source: InputSlice) -> Problem | None:
    index = inputs.index(source.model)
    model = inputs.models[index]
    depth = depth_of(model, inputs.main_stacks[index])
    start, end = source.layer_range
    if end <= depth:
        return None
    return Problem(
        f"{where}.layer_range",
        f"layer_range [{start}, {end}] is out of bounds: {model.label} has "
        f"{depth} layers (0..{depth - 1})",
        f"the end is exclusive; the whole model is [0, {depth}]",
    )


def used_models(groups: list[Group]) -> list[int]:
    """Indexes of the models merged (sources and bases), sorted."""
    return sorted(
        {s.model for g in groups for s in g.sources}
        | {g.base for g in groups if g.base is not None}
    )
