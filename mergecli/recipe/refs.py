"""The one walk over a recipe's model references, with each one's place in the recipe."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from mergecli.recipe.parts import parts
from mergecli.recipe.schema import ModelRef, ModelTokenSource, Recipe, parse_model_ref


def model_refs(recipe: Recipe) -> Iterator[tuple[str, ModelRef]]:
    """(recipe path, reference) for every place that names a model, base first, in order
    of appearance (tokenizer sources last)."""
    if recipe.base_model:
        yield "base_model", recipe.base_model
    for part in parts(recipe):
        at = part.prefix
        for i, model in enumerate(part.models or []):
            yield f"{at}models[{i}].model", model.model
        for i, out_slice in enumerate(part.slices or []):
            if out_slice.base_model:
                yield f"{at}slices[{i}].base_model", out_slice.base_model
            for j, source in enumerate(out_slice.sources):
                yield f"{at}slices[{i}].sources[{j}].model", source.model
    if isinstance(recipe.tokenizer_source, ModelRef):
        yield "tokenizer_source", recipe.tokenizer_source
    yield from _tokenizer_refs(recipe)


def _tokenizer_refs(recipe: Recipe) -> Iterator[tuple[str, ModelRef]]:
    block = recipe.tokenizer
    if block is None:
        return
    if isinstance(block.source, ModelRef):
        yield "tokenizer.source", block.source
    for token, entry in (block.tokens or {}).items():
        source = entry.source
        if isinstance(source, ModelTokenSource):
            yield f"tokenizer.tokens.{token}.source.model", source.model
        elif isinstance(source, ModelRef):
            yield f"tokenizer.tokens.{token}.source", source


def referenced_models(recipe: Recipe) -> list[ModelRef]:
    """Every distinct model the recipe names, base first, in order of appearance."""
    return list(dict.fromkeys(ref for _, ref in model_refs(recipe)))


def recipe_place(recipe: Recipe, ref: ModelRef) -> str:
    """Where in the recipe `ref` is first named."""
    return next(where for where, found in model_refs(recipe) if found == ref)


def raw_model_places(data: Any) -> list[tuple[str, ModelRef]]:
    """(recipe path, reference) of every model named in raw recipe data that did not pass
    the schema, as far as the data can be read (so model problems are reported with the
    recipe's own)."""
    found: list[tuple[str, Any]] = []
    if not isinstance(data, Mapping):
        return []
    found.append(("base_model", data.get("base_model")))
    for at, part in raw_parts(data):
        for i, model in enumerate(dicts(part.get("models"))):
            found.append((f"{at}models[{i}].model", model.get("model")))
        for i, out_slice in enumerate(dicts(part.get("slices"))):
            for j, source in enumerate(dicts(out_slice.get("sources"))):
                found.append((f"{at}slices[{i}].sources[{j}].model", source.get("model")))
    places = []
    for where, raw in found:
        try:
            places.append((where, ModelRef.model_validate(parse_model_ref(raw))))
        except (ValueError, TypeError):
            continue
    return places


def raw_parts(data: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    """(recipe path prefix, mapping holding `models`/`slices`) of raw recipe data: the
    recipe itself, or each module of `modules:`."""
    modules = data.get("modules")
    if isinstance(modules, Mapping):
        return [(f"modules.{k}.", v) for k, v in modules.items() if isinstance(v, Mapping)]
    return [("", data)]


def dicts(value: Any) -> list[Mapping[str, Any]]:
    """The mappings of a raw list (nothing for anything else)."""
    return [v for v in value if isinstance(v, Mapping)] if isinstance(value, list) else []
