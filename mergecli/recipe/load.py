"""Read a recipe file: YAML (safe loader) -> `Recipe`, every problem reported at once."""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Any, Union

import yaml
from pydantic import BaseModel, ValidationError

from mergecli.errors import Problem, RecipeError
from mergecli.recipe import yaml_loader
from mergecli.recipe.check import check_raw, check_recipe
from mergecli.recipe.schema import Recipe
from mergecli.recipe.suggest import closest

MAX_RECIPE_BYTES = 1_000_000
_OWN_ERRORS = {
    "bad_setting",
    "bad_model",
    "bad_dtype",
    "bad_range",
    "input_form",
    "tokenizer_form",
    "bad_tag",
    "tensor_names_form",
}


def load_recipe(path: Path) -> Recipe:
    """Read, parse and check the recipe at `path`; raise `RecipeError` listing every problem."""
    text = read_recipe_text(path)
    return parse_recipe(text, source=str(path))


def read_recipe_text(path: Path) -> str:
    """The recipe file's text, refusing directories, huge files and non-UTF-8 bytes."""
    source = str(path)

    def fail(message: str, hint: str) -> RecipeError:
        return RecipeError([Problem("", message, hint)], source=source)

    if path.is_dir():
        raise fail(f"{path} is a directory, not a recipe file", "give the path of a .yaml file")
    if not path.exists():
        raise fail(
            f"recipe file {path} does not exist",
            "check the path; `mergecli recipes list` shows bundled examples",
        )
    if not path.is_file():
        raise fail(f"{path} is not a regular file", "give the path of a .yaml file")
    size = path.stat().st_size
    if size > MAX_RECIPE_BYTES:
        raise fail(
            f"recipe file is {size} bytes; recipes are limited to {MAX_RECIPE_BYTES} bytes",
            "a recipe lists models and parameters; is this the right file?",
        )
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise fail(
            f"recipe is not UTF-8 text (byte {exc.start})", "save the file as UTF-8"
        ) from None


def parse_recipe(text: str, source: str = "") -> Recipe:
    """Parse recipe YAML text; raise `RecipeError` with every problem found."""
    data = _load_yaml(text, source)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        problems = [_problem_from_pydantic(e) for e in exc.errors()]
        seen = {p.where for p in problems}
        problems += [p for p in check_raw(data) if p.where not in seen]
        raise RecipeError(problems, source) from None
    problems = check_recipe(recipe)
    if problems:
        raise RecipeError(problems, source)
    return recipe


def _load_yaml(text: str, source: str) -> dict[str, Any]:
    try:
        data = yaml_loader.load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "YAML"
        what = exc.problem or "syntax error"
        raise RecipeError(
            [Problem(where, f"YAML syntax error: {what}", "check indentation, colons and quotes")],
            source,
        ) from None
    except yaml.YAMLError as exc:
        raise RecipeError([Problem("", f"YAML error: {exc}", "")], source) from None
    if data is None:
        raise RecipeError(
            [Problem("", "the recipe is empty", "start from `mergecli recipes show quickstart`")],
            source,
        )
    if not isinstance(data, dict):
        raise RecipeError(
            [
                Problem(
                    "",
                    f"a recipe must be a mapping of keys (merge_method, models, ...); "
                    f"found a {type(data).__name__}",
                    "start from `mergecli recipes show quickstart`",
                )
            ],
            source,
        )
    return data


def format_loc(loc: tuple[int | str, ...]) -> str:
    """`('models', 1, 'parameters')` -> `models[1].parameters`."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _clean_loc(loc: tuple[int | str, ...]) -> tuple[int | str, ...]:
    """Drop Pydantic's union-branch and validator labels, keep keys and indices."""
    keep: list[int | str] = []
    for part in loc:
        text = str(part)
        if isinstance(part, str) and (
            "[" in text
            or "function-" in text
            or text in {"ModelRef", "Condition"}
            or text.startswith(("list", "dict", "literal", "tuple", "str", "int", "float", "bool"))
        ):
            continue
        keep.append(part)
    return tuple(keep)


def _problem_from_pydantic(error: Any) -> Problem:
    loc = _clean_loc(tuple(error["loc"]))
    kind = error["type"]
    if kind == "extra_forbidden" and loc:
        key, parent = str(loc[-1]), loc[:-1]
        allowed = _fields_at(parent)
        match = closest(key, allowed)
        where = format_loc(parent) or "the top level"
        message = f"unknown key `{key}` in {where}" + (
            f"; did you mean `{match}`?" if match else ""
        )
        hint = "allowed keys: " + ", ".join(allowed) if allowed else ""
        return Problem(format_loc(loc), message, hint)
    if kind == "missing" and loc:
        where = format_loc(loc[:-1]) or "the top level"
        return Problem(format_loc(loc), f"missing required key `{loc[-1]}` in {where}", "")
    message = str(error["msg"]).removeprefix("Value error, ")
    if "input" in error and kind not in _OWN_ERRORS:
        message += f" (found {_short(error['input'])})"
    return Problem(format_loc(loc), message, "")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The Pydantic model class inside an annotation (through Optional, list, dict, Annotated)."""
    origin = typing.get_origin(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if origin in (Union, types.UnionType, typing.Annotated, list, dict, tuple):
        args = typing.get_args(annotation)
        candidates = args[1:] if origin is dict else args
        for arg in candidates:
            found = _model_in(arg)
            if found is not None:
                return found
    return None


def _fields_at(loc: tuple[int | str, ...]) -> list[str]:
    """Field names of the schema model found at `loc` (empty if it is not a model)."""
    model: type[BaseModel] | None = Recipe
    for part in loc:
        if model is None:
            return []
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return []
        model = _model_in(field.annotation)
    return list(model.model_fields) if model else []
