"""The inputs of a planned tensor: which they are, their work dtype, reading them checked."""

from __future__ import annotations

import torch

from mergecli.engine.numerics import check_finite
from mergecli.io.dtypes import math_dtype
from mergecli.io.reader import TensorReader
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
