"""The method registry: one small pure function per method family plus its spec."""

from __future__ import annotations

from mergecli.methods import (
    interpolate,
    linear,
    mwa,
    passthrough,
    ram,
    research,
    sphere,
    task_vectors,
)
from mergecli.methods.facts import apply, whole_facts
from mergecli.methods.spec import MergeArgs, MethodFn, MethodSpec, ParamSpec, TensorFacts

REGISTRY: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        linear.SPEC,
        passthrough.SPEC,
        *task_vectors.SPECS,
        *interpolate.SPECS,
        *sphere.SPECS,
        *research.SPECS,
        *ram.SPECS,
        mwa.SPEC,
    )
}


def get(name: str) -> MethodSpec | None:
    """The method called `name` (or one of its aliases), if registered."""
    if name in REGISTRY:
        return REGISTRY[name]
    return next((s for s in REGISTRY.values() if name in s.aliases), None)


def names() -> list[str]:
    """Every registered method name, sorted."""
    return sorted(REGISTRY)


__all__ = [
    "REGISTRY",
    "MergeArgs",
    "MethodFn",
    "MethodSpec",
    "ParamSpec",
    "TensorFacts",
    "apply",
    "get",
    "names",
    "whole_facts",
]
