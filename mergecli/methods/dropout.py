"""Random drops of task-vector entries: DARE's uniform drop and DELLA's MagPrune."""

from __future__ import annotations

import torch

from mergecli.methods.kernels.sums import rescale_l1


def dare_keep(delta: torch.Tensor, mask: torch.Tensor, in_place: bool = False) -> torch.Tensor:
    """`delta` with the entries where the 0/1 (or bool) `mask` is 0 zeroed (in `delta`
    itself if `in_place`)."""
    mask = mask.reshape(delta.shape).to(delta.device, delta.dtype)
    return delta.mul_(mask) if in_place else delta * mask


def dare_drop(
    delta: torch.Tensor,
    kept: torch.Tensor,
    density: float,
    rescale: bool,
    mode: str,
    norms: tuple[float, float] | None = None,
) -> torch.Tensor:
    """DARE: `kept` (from `dare_keep`, scaled in place) rescaled by L1 norm or by 1/density."""
    if not rescale:
        return kept
    return rescale_l1(delta, kept, norms) if mode == "l1" else kept.div_(density)


def magprune_probabilities(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA MagPrune's keep probabilities (float64, one per entry of `delta`): per row,
    (density - eps) + 2 eps * rank / (m - 1), rank 0 for the smallest magnitude, ties by
    index."""
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta.reshape(-1, delta.shape[-1])
    m = rows.shape[-1]
    order = torch.argsort(rows.abs(), dim=-1, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(m, device=rows.device).expand_as(order))
    spread = ranks.double() / (m - 1) if m > 1 else torch.zeros(rows.shape, dtype=torch.float64)
    return ((density - epsilon) + 2 * epsilon * spread).reshape(delta.shape)


def magprune(
    delta: torch.Tensor, probs: torch.Tensor, keep: torch.Tensor, rescale: bool
) -> torch.Tensor:
    """DELLA MagPrune: the entries of `delta` drawn to be kept (`keep`, drawn with
    `probs` from `magprune_probabilities`), rescaled by 1/p per entry (the L1 rescale is
    the task-vector methods' `_della`, from whole-tensor norms)."""
    kept = delta * keep.reshape(delta.shape).to(delta.device, delta.dtype)
    return kept.div_(probs.to(delta.device, delta.dtype)) if rescale else kept
