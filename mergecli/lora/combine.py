"""Adapters merged into one adapter, as PEFT's `add_weighted_adapter` does it.

Per module, with each adapter's weight `w` and LoRA scaling `s`:
- `cat`: A = [w1 s1 A1; w2 s2 A2; ...], B = [B1 B2 ...] (rank: the sum of ranks), exact;
- `linear`, `ties`, `dare_linear`, `dare_ties`, `magnitude_prune`: the A matrices and the B
  matrices are each combined as task tensors, with weights sign(ws) sqrt(|ws|) for A and
  sqrt(|ws|) for B (all adapters of one rank);
- `svd`, `ties_svd`, `dare_linear_svd`, `dare_ties_svd`, `magnitude_prune_svd`: the dense
  updates `s B A` are combined with the weights `w`, then factored to `svd_rank` (default:
  the largest rank) by truncated SVD.
The combinations of task tensors (Yadav et al. 2023 for TIES, Yu et al. 2023 for DARE):
magnitude pruning keeps each tensor's `density` largest |entries|; random pruning keeps
each entry with probability `density` and divides by it; TIES elects each entry's sign by
the sum of the pruned tensors (`total`) or of their signs (`frequency`) and averages the
weighted entries that agree with it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch

Combination = Literal[
    "linear", "cat", "svd", "ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd",
    "dare_ties_svd", "magnitude_prune", "magnitude_prune_svd",
]  # fmt: skip
COMBINATIONS: tuple[str, ...] = Combination.__args__  # type: ignore[attr-defined]
SignMethod = Literal["total", "frequency"]


def magnitude_pruned(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """`tensor` with all but its `int(density * numel)` largest |entries| set to 0."""
    if density >= 1:
        return tensor
    flat = tensor.reshape(-1)
    mask = torch.zeros_like(flat)
    mask[torch.topk(flat.abs(), k=int(density * flat.numel())).indices] = 1
    return tensor * mask.reshape(tensor.shape)


def randomly_pruned(
    tensor: torch.Tensor, density: float, generator: torch.Generator
) -> torch.Tensor:
    """DARE: each entry kept with probability `density` and divided by it."""
    if density >= 1:
        return tensor
    keep = torch.bernoulli(torch.full_like(tensor, density), generator=generator)
    return tensor * keep / density


def elected(stacked: torch.Tensor, method: SignMethod) -> torch.Tensor:
    """TIES's sign election: where each tensor's entry has the elected sign (0 never)."""
    signs = stacked.sign()
    magnitude = stacked.sum(0) if method == "total" else signs.sum(0)
    return signs == torch.where(magnitude >= 0, 1, -1)


def combined(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    kind: str,
    density: float,
    sign_method: SignMethod,
    generator: torch.Generator,
) -> torch.Tensor:
    """The task tensors combined by `kind` (a combination without its `_svd`)."""
    if kind in ("ties", "magnitude_prune"):
        tensors = [magnitude_pruned(t, density) for t in tensors]
    elif kind in ("dare_linear", "dare_ties"):
        tensors = [randomly_pruned(t, density, generator) for t in tensors]
    stacked = torch.stack(list(tensors))
    weighted = stacked * torch.tensor(weights, dtype=stacked.dtype).view(
        -1, *[1] * (stacked.dim() - 1)
    )
    if kind not in ("ties", "dare_ties"):
        return weighted.sum(0)
    agree = elected(stacked, sign_method)
    return (weighted * agree).sum(0) / torch.clamp(agree.sum(0), min=1.0)


def factor_weights(weight: float, scale: float) -> tuple[float, float]:
    """The weights of one adapter's A and B for the non-SVD combinations: the sign goes
    on A only, so that the product carries `weight * scale`."""
    product = weight * scale
    root = math.sqrt(abs(product))
    return (root if product >= 0 else -root), root
