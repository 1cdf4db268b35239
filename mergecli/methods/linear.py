"""Linear (weighted average) merging: Wortsman et al., "Model soups" (2022)."""

from __future__ import annotations

import torch

from mergecli.methods.spec import MergeArgs, MethodSpec, ParamSpec


def linear(args: MergeArgs) -> torch.Tensor:
    """sum_i w_i W_i / sum_i w_i; no division when `normalize` is false or the sum is 0."""
    weights = [float(p["weight"]) for p in args.per_model]
    out = torch.zeros_like(args.tensors[0])
    for weight, tensor in zip(weights, args.tensors):
        out.add_(tensor, alpha=weight)
    total = sum(weights)
    if args.params["normalize"] and total != 0:
        out.div_(total)
    return out


SPEC = MethodSpec(
    name="linear",
    fn=linear,
    summary="Weighted average of the models' tensors (model soup).",
    params=(
        ParamSpec("weight", "float", "model", "relative weight of this model", required=True),
        ParamSpec("normalize", "bool", "global", "divide by the sum of the weights", default=True),
    ),
    min_models=1,
    paper="https://arxiv.org/abs/2203.05482",
    elementwise=True,
    peak_copies=5.0,
)
