"""The inputs of a planned tensor: which they are, their work dtype, reading them checked."""

from __future__ import annotations

from collections.abc import Callable

import torch

from mergecli.engine.numerics import check_finite
from mergecli.io.dtypes import math_dtype
from mergecli.io.reader import TensorReader
from mergecli.methods.spec import MergeArgs, TensorFacts
from mergecli.plan.types import InputRef, MergePlan, TensorPlan


def input_refs(tensor: TensorPlan) -> list[InputRef]:
    """The tensor's inputs, then its base when it has one."""
    return [*tensor.inputs, *([tensor.base] if tensor.base else [])]


def work_dtype(plan: MergePlan, tensor: TensorPlan) -> torch.dtype:
    codes = [plan.models[r.model].tensors[r.name].dtype for r in input_refs(tensor)]
    return math_dtype(tensor.dtype, codes)


def load_checked(
    plan: MergePlan,
    model: int,
    name: str,
    reader: TensorReader,
    work: torch.dtype,
    rows: tuple[int, int] | None,
    device: torch.device | None = None,
    check: bool = True,
) -> torch.Tensor:
    tensor = reader.read(plan.models[model], name, rows).to(device).to(work)
    if check:
        check_finite(plan, model, name, tensor)
    return tensor


def load_all(
    plan: MergePlan,
    refs: list[InputRef],
    reader: TensorReader,
    work: torch.dtype,
    rows: tuple[int, int] | None,
    device: torch.device | None = None,
    check: bool = True,
) -> list[torch.Tensor]:
    """Every input of `refs` read and converted (see `load_checked`); a stored tensor that
    several inputs share (one base under several adapters) is read once, and no two
    entries of the list are one tensor (methods may change their inputs in place)."""
    loaded: list[torch.Tensor] = []
    with reader.sharing():
        for r in refs:
            tensor = load_checked(plan, r.model, r.name, reader, work, rows, device, check)
            loaded.append(tensor.clone() if any(t is tensor for t in loaded) else tensor)
    return loaded


def merge_args(
    plan: MergePlan,
    tensor: TensorPlan,
    loaded: list[torch.Tensor],
    rows: tuple[int, int] | None,
    facts: Callable[[int], TensorFacts | None],
) -> MergeArgs:
    """The method's arguments for `tensor` (or its `rows`) from its inputs as loaded (the
    base last, when it has one); `facts` gives the whole-tensor facts for the flat offset
    of the first entry."""
    base = loaded[-1] if tensor.base else None
    return MergeArgs(
        tensors=loaded[:-1] if tensor.base else loaded,
        base=base,
        params=tensor.params,
        per_model=tensor.per_model,
        name=tensor.name,
        seed=plan.seed,
        facts=facts(0 if rows is None else rows[0] * tensor.row_numel),
        whole_shape=tuple(tensor.shape),
    )
