"""Passthrough: copy one input tensor (used with slices for frankenmerges and upscaling)."""

from __future__ import annotations

import torch

from mergecli.methods.spec import MergeArgs, MethodSpec, ParamSpec


def passthrough(args: MergeArgs) -> torch.Tensor:
    """The single input tensor, multiplied by `scale` when one is given."""
    scale = args.per_model[0].get("scale")
    tensor = args.tensors[0]
    return tensor if scale is None or scale == 1 else tensor * float(scale)


SPEC = MethodSpec(
    name="passthrough",
    fn=passthrough,
    summary="Copy each tensor from its single source unchanged (stack layers with slices).",
    params=(ParamSpec("scale", "float", "model", "multiply the tensor by this factor"),),
    min_models=1,
    max_models=1,
    paper="https://arxiv.org/abs/2312.15166",
    elementwise=True,
    copies=lambda params, per_model: all(p.get("scale") in (None, 1) for p in per_model),
    count_hint="to stack layers of several models use `slices:`",
)
