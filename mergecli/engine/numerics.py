"""NaN/Inf checks of inputs and results, and the one cast to the output dtype."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from mergecli.errors import NumericsError
from mergecli.plan.types import InputRef, MergePlan


def finite_range(tensor: torch.Tensor) -> tuple[bool, float]:
    """(all finite, largest magnitude) in one pass without tensor-sized temporaries."""
    if tensor.numel() == 0:
        return True, 0.0
    low, high = (float(v) for v in torch.aminmax(tensor))
    finite = math.isfinite(low) and math.isfinite(high)
    return finite, max(abs(low), abs(high))


def check_unvouched(
    plan: MergePlan,
    refs: Sequence[InputRef],
    inputs: Sequence[torch.Tensor],
    sums: Sequence[Sequence[Sequence[float]]],
    has_base: bool,
) -> None:
    """NaN/Inf check of a block's inputs that its statistics do not vouch for. Model i's
    sums (`MethodSpec.sums`) run over every entry of its tensor and of the base, so when
    they are finite so are those inputs (a NaN or Inf entry makes them NaN or Inf). Every
    other input, or all of them when a sum is not finite (finite inputs can overflow one),
    is checked entry by entry (all of them for a method whose sums are counts)."""
    models = len(refs) - has_base
    vouching = plan.method.sums_vouch
    present = [i for i in range(min(models, len(sums))) if sums[i] and vouching]
    finite = all(math.isfinite(x) for i in present for rows in sums[i] for x in rows)
    vouched = set(present) if finite else set()
    if has_base and vouched:
        vouched.add(models)  # the base is the last ref
    for i, (ref, tensor) in enumerate(zip(refs, inputs)):
        if i not in vouched:
            check_finite(plan, ref.model, ref.name, tensor)


def check_finite(plan: MergePlan, model: int, name: str, tensor: torch.Tensor) -> None:
    if not finite_range(tensor)[0]:
        bad = int((~torch.isfinite(tensor)).sum())
        raise NumericsError(
            f"tensor `{name}` of {plan.models[model].label} holds {bad} NaN/Inf values",
            hint="the input checkpoint is damaged; re-download or re-save it",
        )


def cast_checked(
    result: torch.Tensor, out_dtype: torch.dtype, name: str, clamp: bool
) -> tuple[torch.Tensor, int]:
    """Cast to the output dtype; values beyond its range are an error, or clamped (counted)."""
    finite, peak = finite_range(result)
    if not finite:
        raise NumericsError(
            f"merged tensor `{name}` has NaN/Inf values", hint="check the method's parameters"
        )
    over = 0
    if out_dtype.is_floating_point and peak > torch.finfo(out_dtype).max:
        limit = torch.finfo(out_dtype).max
        over = int((result.abs() > limit).sum())
        if not clamp:
            raise NumericsError(
                f"merged tensor `{name}` reaches {peak:.4g}, beyond the {out_dtype} range ({limit:.4g})",
                hint="use out_dtype: bfloat16 or float32, or pass --clamp-overflow",
            )
        if over:
            result = result.clamp(-limit, limit)
    return result.to(out_dtype), over
