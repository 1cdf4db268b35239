"""The recipe's input parts: the whole model (`models:` or `slices:`), or one per module of
the multi-module form (`modules:`), each with its place in the recipe."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mergecli import methods
from mergecli.recipe.schema import InputModel, ModelRef, OutputSlice, Recipe
from mergecli.recipe.settings import Parameters


@dataclass(frozen=True)
class Part:
    """One input part: `module` is None for the whole model; `prefix` is its recipe path
    prefix (`""` or `modules.vision_tower.`); `params` the module's own `parameters:`."""

    module: str | None
    prefix: str
    models: Sequence[InputModel] | None
    slices: Sequence[OutputSlice] | None
    params: Parameters | None


def parts(recipe: Recipe) -> list[Part]:
    """The recipe's parts in the order written."""
    if recipe.modules:
        return [
            Part(name, f"modules.{name}.", m.models, m.slices, m.parameters)
            for name, m in recipe.modules.items()
        ]
    return [Part(None, "", recipe.models, recipe.slices, None)]


def first_model(part: Part) -> ModelRef:
    """The first model a part names (a schema-valid part names at least one)."""
    if part.models:
        return part.models[0].model
    assert part.slices
    return part.slices[0].sources[0].model


def base_joins(recipe: Recipe) -> bool:
    """True when the `base_model` of a `models:` recipe is merged as one more model: with
    a method that takes no base (linear, karcher, ...), mergekit appends the base to the
    models, with only the top-level parameters; passthrough takes one model, so not there."""
    spec = methods.get(recipe.merge_method)
    return spec is not None and not spec.uses_base and spec.max_models != 1
