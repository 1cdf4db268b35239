"""Sums that do not depend on how a tensor is cut into row blocks (equal to
`reference.total`), and exact quantiles."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def rescale_l1(
    original: torch.Tensor, kept: torch.Tensor, norms: tuple[float, float] | None = None
) -> torch.Tensor:
    """Scale `kept` in place so its L1 norm equals `original`'s (unchanged when either is
    ~0); `norms` = (|original|_1, |kept|_1) over the whole tensor when these are a block."""
    factor = l1_factor(norms if norms is not None else dare_norms(original, kept))
    return kept if factor == 1 else kept.mul_(factor)


def l1_factor(norms: tuple[float, float]) -> float:
    """|original|_1 / |kept|_1 from `norms` = (|original|_1, |kept|_1); 1 when either is ~0."""
    before, after = norms
    return before / after if before >= 1e-8 and after >= 1e-8 else 1.0


def dare_norms(delta: torch.Tensor, kept: torch.Tensor) -> tuple[float, float]:
    """(|delta|_1, |kept|_1), the same however the tensor is cut into row blocks: sums of
    each row in the work dtype (cascade summation; float32 for 16-bit inputs: this is a
    rescale factor, not an output value), added exactly."""
    work = delta.dtype
    return exact_total([row_sums(delta.abs(), work)]), exact_total([row_sums(kept.abs(), work)])


def row_sums(values: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Sum of each row accumulated in `dtype` (a 0-D or 1-D tensor is one row): a row's sum
    does not depend on which block of rows it was computed in."""
    count = values.shape[0] if values.dim() > 1 else 1
    if values.numel() == 0:
        return torch.zeros(count, dtype=dtype, device=values.device)  # reshape can't infer -1
    return values.reshape(count, -1).sum(dim=1, dtype=dtype)


def exact_total(parts: Sequence[torch.Tensor]) -> float:
    """The correctly rounded sum of per-row sums (math.fsum), independent of their grouping."""
    return math.fsum(torch.cat([p.reshape(-1) for p in parts]).tolist()) if parts else 0.0


def lower_quantile(values: torch.Tensor, q: float) -> float:
    """The q-quantile as the lower order statistic: the entry at index floor(q (n - 1)) of
    the sorted values (mergekit's rule), by selection, not sorting."""
    flat = values.reshape(-1)
    return float(torch.kthvalue(flat, math.floor(q * (flat.numel() - 1)) + 1).values)


def gram_sums(vectors: Sequence[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Per vector i, per-row sums (float64 products) of v_i * v_j for each j >= i: what
    `gram_matrix` needs, as a method's `sums` (model i's run over its own entries)."""
    wide = [v.double() for v in vectors]
    return [[row_sums(v * w) for w in wide[i:]] for i, v in enumerate(wide)]


def gram_matrix(sums: Sequence[Sequence[float]]) -> list[list[float]]:
    """The symmetric matrix of dot products v_i . v_j from `gram_sums`' totals."""
    n = len(sums)
    return [[sums[min(i, j)][abs(j - i)] for j in range(n)] for i in range(n)]


def group_sums(values: torch.Tensor, group: int) -> torch.Tensor:
    """Sums over dim 0 (float64) of each run of `group` rows, stacked: one reduction per
    group, so a group's sum is the same whichever block of rows (starting at a multiple of
    `group`) holds it."""
    rows = values.shape[0]
    parts = [values[s : s + group].sum(dim=0, dtype=torch.float64) for s in range(0, rows, group)]
    if not parts:
        return torch.zeros((0, *values.shape[1:]), dtype=torch.float64, device=values.device)
    return torch.stack(parts)


def add_groups(total: torch.Tensor | None, partials: torch.Tensor) -> torch.Tensor:
    """`total` plus each group's partial sum of `partials` in order (one at a time, so the
    result does not depend on how the groups were cut into blocks)."""
    for partial in partials:
        total = partial.clone() if total is None else total.add_(partial)
    if total is None:  # a tensor without rows
        return torch.zeros(partials.shape[1:], dtype=torch.float64, device=partials.device)
    return total


def largest(values: torch.Tensor) -> float:
    """The largest entry (-inf for none): per-row maxima reduced to a tensor's maximum."""
    return float(values.max()) if values.numel() else -math.inf


def row_max(values: torch.Tensor) -> torch.Tensor:
    """The largest entry of each row (a 0-D or 1-D tensor is one row; -inf for no entry)."""
    count = values.shape[0] if values.dim() > 1 else 1
    if values.numel() == 0:
        return torch.full((count,), -math.inf, dtype=values.dtype, device=values.device)
    return values.reshape(count, -1).amax(dim=1)
