"""Post-steps applied to planned tensors (LiNeS layer scaling)."""

from __future__ import annotations

from dataclasses import replace

from mergecli.model.layers import layer_counts, split_layer
from mergecli.plan.types import TensorPlan
from mergecli.recipe.schema import Recipe


def apply_lines(recipe: Recipe, tensors: list[TensorPlan]) -> list[TensorPlan]:
    """LiNeS: scale each merged task vector by alpha + beta * l / (L - 1) for layer l of L
    (per layer stack of the output); tensors outside the layers get alpha."""
    lines = recipe.post.lines if recipe.post else None
    if lines is None:
        return tensors
    depths = layer_counts([t.name for t in tensors])
    out = []
    for tensor in tensors:
        split = split_layer(tensor.name)
        frac = 0.0
        if split is not None and depths[split.stack] > 1:
            frac = split.index / (depths[split.stack] - 1)
        scale = lines.alpha + lines.beta * frac
        out.append(replace(tensor, post_scale=scale) if tensor.base is not None else tensor)
    return out
