"""Parameter settings: a scalar, a gradient, or a list of filter conditions.

`evaluate` turns a setting into the value for one tensor, given the tensor's name and its
relative depth `t` in [0, 1] (see recipe.md): gradients are interpolated linearly over the
layers, non-numeric lists pick the nearest-lower entry, and the first condition whose
`filter` is a substring of the tensor name (or is absent / `*`) wins.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, StrictBool, StrictFloat, StrictInt
from pydantic_core import PydanticCustomError

from mergecli.recipe.suggest import did_you_mean

Scalar = StrictBool | StrictInt | StrictFloat | str
ScalarOrGradient = Scalar | list[Scalar]


class Condition(BaseModel):
    """`{filter: self_attn, value: 0.5}`: applies when `filter` is in the tensor name."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    filter: str | None = None
    value: ScalarOrGradient


_CONDITION_KEYS = ("filter", "value")


def _is_scalar(value: Any) -> bool:
    return isinstance(value, (bool, int, float, str))


def _check_condition(item: dict[Any, Any]) -> None:
    for key in item:
        if key not in _CONDITION_KEYS:
            raise PydanticCustomError(
                "bad_setting",
                "unknown key `{key}` in a filter condition{hint}; a condition has only "
                "`filter` and `value`",
                {"key": key, "hint": did_you_mean(str(key), _CONDITION_KEYS, prefix="; ")},
            )
    if "value" not in item:
        raise PydanticCustomError(
            "bad_setting", "a filter condition needs a `value` (e.g. {filter: mlp, value: 0.5})"
        )
    value = item["value"]
    if not (
        _is_scalar(value) or (isinstance(value, list) and value and all(map(_is_scalar, value)))
    ):
        raise PydanticCustomError(
            "bad_setting", "a condition's `value` must be a number, a string or a gradient list"
        )


def _check_finite(raw: Any) -> None:
    """NaN and infinities pass every range check (all comparisons are false): refuse them."""
    leaves = raw if isinstance(raw, list) else [raw]
    for leaf in leaves:
        value = leaf.get("value") if isinstance(leaf, dict) else leaf
        for number in value if isinstance(value, list) else [value]:
            if isinstance(number, float) and not math.isfinite(number):
                raise PydanticCustomError(
                    "bad_setting", "{value} is not a finite number", {"value": repr(number)}
                )


_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


def _numbers(raw: Any) -> Any:
    """Numbers that YAML 1.1 reads as strings (`1e-5`, `1E10`: no decimal point) as the
    floats they are, as mergekit's schema converts them; in gradients and condition values."""
    if isinstance(raw, str) and _NUMBER.match(raw.strip()):
        return float(raw)
    if isinstance(raw, list):
        return [_numbers(item) for item in raw]
    if isinstance(raw, dict) and "value" in raw:
        return {**raw, "value": _numbers(raw["value"])}
    return raw


def _check_setting(raw: Any) -> Any:
    """Reject shapes that are not a setting, with one clear message instead of a union dump."""
    raw = _numbers(raw)
    _check_finite(raw)
    if _is_scalar(raw):
        return raw
    if isinstance(raw, dict):
        _check_condition(raw)
        return raw
    if isinstance(raw, list) and raw:
        if all(_is_scalar(x) for x in raw):
            return raw
        if all(isinstance(x, dict) for x in raw):
            for item in raw:
                _check_condition(item)
            return raw
        raise PydanticCustomError(
            "bad_setting",
            "a list must hold only numbers (a gradient) or only {filter, value} conditions",
        )
    if isinstance(raw, list):
        raise PydanticCustomError("bad_setting", "an empty list is not a value")
    raise PydanticCustomError(
        "bad_setting",
        "expected a number, true/false, a string, a gradient list or filter conditions; "
        "found {kind}",
        {"kind": "nothing (null)" if raw is None else type(raw).__name__},
    )


Setting = Annotated[
    Scalar | list[Scalar] | Condition | list[Condition], BeforeValidator(_check_setting)
]
Parameters = dict[str, Setting]


def _interpolate(gradient: list[Any], t: float) -> Any:
    if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in gradient):
        scaled = t * (len(gradient) - 1)
        low = int(scaled)
        high = min(len(gradient) - 1, low + 1)
        frac = scaled - low
        return (1 - frac) * gradient[low] + frac * gradient[high]
    return gradient[int(t * (len(gradient) - 1))]


def evaluate(setting: Any, tensor_name: str, t: float) -> Any:
    """The value of `setting` for `tensor_name` at depth `t`; None when no condition matches."""
    if isinstance(setting, Condition):
        setting = [setting]
    if isinstance(setting, list):
        if setting and isinstance(setting[0], Condition):
            for cond in setting:
                if cond.filter in (None, "*") or cond.filter in tensor_name:
                    return evaluate(cond.value, tensor_name, t)
            return None
        return _interpolate(setting, t)
    return setting


def leaf_values(setting: Any) -> list[Any]:
    """Every scalar a setting can produce at its gradient points (for range checks)."""
    if isinstance(setting, Condition):
        return leaf_values(setting.value)
    if isinstance(setting, dict):
        return leaf_values(setting.get("value"))
    if isinstance(setting, list):
        out: list[Any] = []
        for item in setting:
            out.extend(leaf_values(item))
        return out
    return [setting]


def to_plain(setting: Any) -> Any:
    """The setting as plain YAML/JSON data."""
    if isinstance(setting, Condition):
        return setting.model_dump(exclude_none=True)
    if isinstance(setting, list):
        return [to_plain(x) for x in setting]
    return setting
