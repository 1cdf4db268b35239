"""Plain math of the weighted and task-vector methods: linear, task arithmetic, TIES, DARE, breadcrumbs, DELLA, SCE, RAM, MWA."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from mergecli.methods.reference.kernels import Tensor, add_all, keep_count, ties_merge, top_k_mask


def linear(tensors: Sequence[Tensor], weights: Sequence[float], normalize: bool) -> Tensor:
    """sum_i w_i W_i, divided by sum_i w_i when normalizing and that sum is not 0."""
    out = add_all(w * t for w, t in zip(weights, tensors))
    return out / sum(weights) if normalize and sum(weights) != 0 else out


def passthrough(tensor: Tensor, scale: float | None) -> Tensor:
    """The single input, times `scale` when given."""
    return tensor if scale is None else tensor * scale


def task_arithmetic(
    base: Tensor, tensors: Sequence[Tensor], weights: Sequence[float], lam: float, normalize: bool
) -> Tensor:
    """Ilharco et al. 2023: B + lambda * sum_i w_i (W_i - B) (over sum_i w_i when normalizing)."""
    return base + lam * linear([t - base for t in tensors], weights, normalize)


def ties(
    base: Tensor,
    tensors: Sequence[Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    lam: float,
    normalize: bool,
    count: bool = False,
) -> Tensor:
    """TIES: trim each task vector to its top-k magnitudes, elect signs (by sum, or by
    count), disjoint merge."""
    trimmed = [trim(t - base, d) for t, d in zip(tensors, densities)]
    return base + lam * ties_merge(trimmed, weights, normalize, count)


def trim(delta: Tensor, density: float) -> Tensor:
    """`delta` with all but its keep_count(density) largest magnitudes zeroed."""
    if density >= 1:
        return delta
    return delta * top_k_mask(delta.abs(), keep_count(delta.numel(), density))


def dare(
    base: Tensor,
    tensors: Sequence[Tensor],
    masks: Sequence[Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    params: dict[str, object],
    elect: bool,
) -> Tensor:
    """DARE (Yu et al. 2024): drop entries where the keep mask is 0, rescale by 1/density
    or so that each task vector keeps its L1 norm, then add (or TIES-merge with `elect`)."""
    kept = []
    for t, m, density in zip(tensors, masks, densities):
        delta = t - base
        if density >= 1:
            kept.append(delta)
            continue
        dropped = delta * m
        if params["rescale"]:
            dropped = _rescale(delta, dropped, density, str(params["rescale_mode"]))
        kept.append(dropped)
    return _combine(base, kept, weights, params, elect)


def _rescale(delta: Tensor, kept: Tensor, p: float | Tensor, mode: str) -> Tensor:
    if mode != "l1":
        return kept / p
    before, after = float(delta.abs().sum()), float(kept.abs().sum())
    return kept * (before / after) if before >= 1e-8 and after >= 1e-8 else kept


def _combine(
    base: Tensor,
    deltas: Sequence[Tensor],
    weights: Sequence[float],
    params: dict[str, object],
    elect: bool,
) -> Tensor:
    lam, normalize = float(params["lambda"]), bool(params["normalize"])  # type: ignore[arg-type]
    merged = ties_merge(deltas, weights, normalize) if elect else linear(deltas, weights, normalize)
    return base + lam * merged


def breadcrumbs(
    base: Tensor,
    tensors: Sequence[Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    gammas: Sequence[float],
    params: dict[str, object],
    elect: bool,
) -> Tensor:
    """Model Breadcrumbs (Davari & Belilovsky 2023): drop the gamma fraction of largest
    magnitudes (nothing when floor(gamma n) = 0) and the smallest, keeping `density`."""
    kept = []
    for t, density, gamma in zip(tensors, densities, gammas):
        delta = t - base
        n = delta.numel()
        target = keep_count(n, density) if density < 1 else n
        top = min(math.floor(gamma * n + 1e-9), n - target)
        magnitude = delta.abs()
        kept.append(delta * (top_k_mask(magnitude, target + top) & ~top_k_mask(magnitude, top)))
    return _combine(base, kept, weights, params, elect)


def della_probabilities(delta: Tensor, density: float, epsilon: float) -> Tensor:
    """DELLA MagPrune (Deep et al. 2024): per row, p = density - eps + 2 eps r / (m - 1)
    for the entry of magnitude rank r (0 the smallest, ties by index) among m."""
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta.reshape(-1, delta.shape[-1])
    m = rows.shape[1]
    p = torch.empty(rows.shape, dtype=torch.float64)
    for i, row in enumerate(rows):
        order = torch.sort(row.abs(), stable=True).indices
        for rank, j in enumerate(order.tolist()):
            p[i, j] = (density - epsilon) + 2 * epsilon * (rank / (m - 1) if m > 1 else 0.0)
    return p.reshape(delta.shape)


def della(
    base: Tensor,
    tensors: Sequence[Tensor],
    masks: Sequence[Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    epsilons: Sequence[float],
    params: dict[str, object],
    elect: bool,
) -> Tensor:
    """DELLA: MagPrune's drop (masks drawn with `della_probabilities`), rescaled by L1 norm
    or by 1/p per entry, then TIES-merged (`elect`) or added."""
    kept = []
    for t, m, density, epsilon in zip(tensors, masks, densities, epsilons):
        delta = t - base
        dropped = delta * m
        if params["rescale"]:
            p = della_probabilities(delta, density, epsilon).to(delta.dtype)
            dropped = _rescale(delta, dropped, p, str(params["rescale_mode"]))
        kept.append(dropped)
    return _combine(base, kept, weights, params, elect)


def sce(base: Tensor, tensors: Sequence[Tensor], select_topk: float) -> Tensor:
    """SCE (Wan et al. 2024): keep the positions of highest variance across models; weight
    each task vector by its share of mean squared entry; erase entries disagreeing with the
    elected sign; average the rest by those weights."""
    d = torch.stack([t - base for t in tensors])
    if select_topk < 1:
        variance = d.var(dim=0, unbiased=False)
        d = d * top_k_mask(variance, keep_count(variance.numel(), select_topk))
    energy = torch.stack([(x * x).mean() for x in d])
    share = energy / energy.sum() if float(energy.sum()) > 0 else torch.zeros_like(energy)
    sign = torch.where(d.sum(0) >= 0, 1.0, -1.0).to(d.dtype)
    numerator = torch.zeros_like(base)
    denominator = torch.zeros_like(base)
    for c, x in zip(share, d):
        agree = (torch.sign(x) == sign).to(x.dtype)
        numerator = numerator + c * agree * x
        denominator = denominator + c * agree
    return base + numerator / torch.where(denominator == 0, 1.0, denominator)


def mwa(tensors: Sequence[Tensor], metrics: Sequence[float], penalty: float) -> Tensor:
    """Metrics-weighted averaging: w_i = exp(-penalty m_i) / sum_j exp(-penalty m_j)."""
    raw = [math.exp(-penalty * m) for m in metrics]
    return linear(tensors, [r / sum(raw) for r in raw], False)


def ram(
    base: Tensor, tensors: Sequence[Tensor], epsilon: float, r: float = 0.0, alpha: float = 0.0
) -> Tensor:
    """RAM (arXiv 2601.13572): at each entry, the models whose task vector changed it by
    more than epsilon; one such model: its change; several: their mean change. With r > 0
    (RAM+, tensor-local) model i's unique changes are scaled by
    1 + r * clamp(shared_i / max(unique_i, epsilon), 0, alpha)."""
    deltas = [(t - base).reshape(-1) for t in tensors]
    flat = torch.zeros_like(deltas[0])
    active = [[abs(float(d[j])) > epsilon for d in deltas] for j in range(flat.numel())]
    lam = []
    for i in range(len(deltas)):
        unique = sum(1 for a in active if a[i] and sum(a) == 1)
        shared = sum(1 for a in active if a[i] and sum(a) > 1)
        lam.append(1 + r * min(max(shared / max(unique, epsilon), 0.0), alpha))
    for j, a in enumerate(active):
        count = sum(a)
        for i, d in enumerate(deltas):
            if a[i]:
                flat[j] += d[j] * lam[i] if count == 1 else d[j] / count
    return base + flat.reshape(base.shape)
