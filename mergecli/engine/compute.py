"""Compute one output tensor (or a block of its rows): read, check, merge in float32/64, cast."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mergecli.engine.inputs import input_refs, load_all, load_checked, merge_args, work_dtype
from mergecli.engine.numerics import cast_checked, check_finite
from mergecli.engine.stats import BlockStats
from mergecli.errors import NumericsError
from mergecli.io.dtypes import CODE_TO_TORCH, math_dtype
from mergecli.io.reader import TensorReader
from mergecli.methods.facts import apply
from mergecli.plan.types import MergePlan, TensorPlan
from mergecli.vocab.reindex import merge_rows


@dataclass(frozen=True)
class Computed:
    """One merged tensor, its per-task masks (when asked) and how many values were clamped."""

    tensor: torch.Tensor
    masks: list[torch.Tensor]
    clamped: int = 0


def compute_tensor(
    plan: MergePlan,
    tensor: TensorPlan,
    reader: TensorReader,
    with_masks: bool = False,
    clamp: bool = False,
    rows: tuple[int, int] | None = None,
    stats: BlockStats | None = None,
    device: torch.device | None = None,
    given: list[torch.Tensor] | None = None,
    cast: bool = True,
) -> Computed:
    """Read the inputs of one output tensor (or of its `rows` for element-wise methods),
    merge them in float32/64 and cast to its dtype; also return the method's per-task masks
    when asked. With `device` the math runs there (inputs moved after reading). `given`:
    the inputs already read (and checked) by the statistics pass. Without `cast`, the
    result stays in the work dtype (float32/64)."""
    out_dtype = CODE_TO_TORCH[tensor.dtype]
    if tensor.vocab_names is not None:
        return _compute_vocab(plan, tensor, reader, clamp)
    if tensor.copy:
        ref = tensor.inputs[0]
        copied = reader.read(plan.models[ref.model], ref.name, rows).to(out_dtype)
        if copied.is_floating_point():
            check_finite(plan, ref.model, ref.name, copied)  # a copy is an output value too
        return Computed(copied, [])
    work = work_dtype(plan, tensor)
    check = not (stats and stats.inputs_checked)
    loaded = (
        [t.to(device) for t in given]
        if given is not None
        else load_all(plan, input_refs(tensor), reader, work, rows, device, check)
    )
    args = merge_args(plan, tensor, loaded, rows, stats.facts if stats else lambda _: None)
    base = args.base
    try:
        result = apply(plan.method, args)
    except ValueError as exc:  # a method's own refusal of these inputs
        raise NumericsError(
            f"`{plan.method.name}` cannot merge tensor `{tensor.name}`: {exc}",
            hint="change the weights or the method",
        ) from None
    if tensor.post_scale is not None and base is not None:
        result = base + tensor.post_scale * (result - base)
    masks = plan.method.masks(args) if with_masks and plan.method.masks and base is not None else []
    if not cast:  # the merged tensor in its work dtype (an adapter is factored from it)
        return Computed(result.cpu(), [m.cpu() for m in masks])
    final, clamped = cast_checked(result, out_dtype, tensor.name, clamp)
    return Computed(final.cpu(), [m.cpu() for m in masks], clamped)


def _compute_vocab(
    plan: MergePlan, tensor: TensorPlan, reader: TensorReader, clamp: bool
) -> Computed:
    """A per-token tensor: every model's rows re-indexed to the output vocabulary, merged."""
    assert plan.vocab is not None and tensor.vocab_names is not None
    names = tensor.vocab_names
    codes = [plan.models[m].tensors[n].dtype for m, n in names.items()]
    work = math_dtype(tensor.dtype, codes)
    with reader.sharing():
        loaded = {m: load_checked(plan, m, n, reader, work, None) for m, n in names.items()}
    result = merge_rows(plan.vocab, tensor, loaded, plan.method, plan.seed)
    cast, clamped = cast_checked(result, CODE_TO_TORCH[tensor.dtype], tensor.name, clamp)
    return Computed(cast, [], clamped)
