"""Every method on empty tensors, scalars, single rows and columns: no crash, the planned
shape, and the base (or the common input) back when every input is the same."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from mergecli import methods
from mergecli.methods.spec import MergeArgs, MethodSpec

SHAPES = [(0,), (0, 5), (4, 0), (), (1,), (1, 7), (7, 1)]


def _count(spec: MethodSpec) -> int:
    return max(spec.min_models, min(3, spec.max_models or 3))


def _per_model(spec: MethodSpec, count: int) -> list[dict[str, Any]]:
    values = {p.name: p.default for p in spec.scoped("model")}
    if "weight" in values:
        values["weight"] = 1.0
    if "density" in values:
        values["density"] = 0.5
    if spec.name == "mwa":
        return [{"weight": 1 / count}] * count
    return [dict(values) for _ in range(count)]


def _params(spec: MethodSpec) -> dict[str, Any]:
    params = {p.name: p.default for p in spec.scoped("global")}
    if "t" in params and params["t"] is None:
        params["t"] = 0.4
    return params


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("name", methods.names())
def test_degenerate_shapes(name: str, shape: tuple[int, ...]) -> None:
    spec = methods.get(name)
    assert spec is not None
    count = _count(spec)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    base = x.clone() if spec.uses_base else None
    args = MergeArgs(
        [x.clone() for _ in range(count)], base, _params(spec), _per_model(spec, count), "w", 0
    )
    got = methods.apply(spec, args)
    assert got.shape == x.shape and got.dtype == x.dtype
    torch.testing.assert_close(got, x, rtol=1e-9, atol=1e-12)
