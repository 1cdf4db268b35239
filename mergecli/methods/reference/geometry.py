"""Plain math of the interpolation and hypersphere methods: slerp, nearswap, Model Stock, Arcee Fusion, NuSLERP, Multi-SLERP, Karcher."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from mergecli.methods.reference.kernels import Tensor, add_all

PARALLEL = 0.9995  # |cos| above which slerp interpolates linearly


def slerp_flat(a: Tensor, c: Tensor, t: float) -> Tensor:
    """Shoemake 1985 over the flattened tensors; linear when (anti)parallel or zero."""
    na, nc = float(a.norm()), float(c.norm())
    if na == 0 or nc == 0:
        return (1 - t) * a + t * c
    cos = float((a * c).sum()) / (na * nc)
    if abs(cos) > PARALLEL:
        return (1 - t) * a + t * c
    theta = math.acos(max(-1.0, min(1.0, cos)))
    return (math.sin((1 - t) * theta) * a + math.sin(t * theta) * c) / math.sin(theta)


def nearswap(a: Tensor, c: Tensor, t: float) -> Tensor:
    """A moved towards C where they are close: weight clamp(t / max(|A - C|, 1e-6), 0, 1)."""
    weight = torch.clamp(t / torch.clamp((c - a).abs(), min=1e-6), 0, 1)
    return a + weight * (c - a)


def model_stock(base: Tensor, tensors: Sequence[Tensor], filter_wise: bool) -> Tensor:
    """Model Stock (Jang et al. 2024): t = n c / (1 + (n - 1) c) from the mean pairwise
    cosine c of the task vectors (per row with `filter_wise`); t mean(W) + (1 - t) B."""
    n = len(tensors)
    if filter_wise and base.dim() >= 2:
        rows = [model_stock(base[i], [t[i] for t in tensors], False) for i in range(base.shape[0])]
        return torch.stack(rows)
    deltas = [(t - base).reshape(-1) for t in tensors]
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    cos = sum(cosine(deltas[i], deltas[j]) for i, j in pairs) / len(pairs)
    denominator = 1 + (n - 1) * cos
    ratio = 0.0 if abs(denominator) < 1e-8 else n * cos / denominator
    return ratio * (add_all(tensors) / n) + (1 - ratio) * base


def cosine(x: Tensor, y: Tensor, eps: float = 1e-8) -> float:
    return float((x * y).sum()) / max(float(x.norm()) * float(y.norm()), eps)


def arcee_fusion(a: Tensor, c: Tensor) -> Tensor:
    """Take C's change where importance |C - A| * KL(p || q) (over the last dimension,
    p = softmax C + 1e-8, q = softmax A + 1e-8) reaches median + 1.5 IQR of all
    importances; a quantile is the sorted values' entry at floor(q (n - 1))."""
    p = torch.softmax(c, dim=-1) + 1e-8
    q = torch.softmax(a, dim=-1) + 1e-8
    importance = (c - a).abs() * (p * torch.log(p / q)).sum(dim=-1, keepdim=True)
    ordered = torch.sort(importance.reshape(-1)).values
    at = [math.floor(f * (ordered.numel() - 1)) for f in (0.25, 0.5, 0.75)]
    q1, median, q3 = (float(ordered[i]) for i in at)
    return a + (c - a) * (importance >= median + 1.5 * (q3 - q1))


def nuslerp(
    tensors: Sequence[Tensor], base: Tensor | None, weights: Sequence[float], axis: int | None
) -> Tensor:
    """NuSLERP (mergekit): slerp of two models (or task vectors) at t = w2 / (w1 + w2), over
    the whole tensor (`axis` None) or for each slice along `axis`; linear only where the
    vectors are colinear (1 - cos^2 <= 1e-16), norms clamped at 1e-7."""
    t = 0.5 if abs(sum(weights)) < 1e-6 else weights[1] / sum(weights)
    x, y = tensors if base is None else (tensors[0] - base, tensors[1] - base)
    if axis is None:
        out = _nu_slerp(x.reshape(-1), y.reshape(-1), t).reshape(x.shape)
    else:
        pairs = zip(x.unbind(1 - axis), y.unbind(1 - axis))
        out = torch.stack([_nu_slerp(u, v, t) for u, v in pairs], dim=1 - axis)
    return out if base is None else out + base


def _nu_slerp(a: Tensor, c: Tensor, t: float) -> Tensor:
    cos = float((a / max(float(a.norm()), 1e-7) * (c / max(float(c.norm()), 1e-7))).sum())
    cos = max(-1.0, min(1.0, cos))
    if 1 - cos * cos <= 1e-16:
        return (1 - t) * a + t * c
    theta = math.acos(cos)
    return (math.sin((1 - t) * theta) * a + math.sin(t * theta) * c) / math.sin(theta)


def multislerp(
    tensors: Sequence[Tensor], base: Tensor | None, weights: Sequence[float], eps: float
) -> Tensor:
    """Multi-SLERP as mergekit defines it (normalised weights): unit vectors, their weighted
    mean m on the sphere, the weighted orthogonal projections onto m's tangent space, one
    exponential-map step from m, scaled by the weighted mean norm."""
    if len(tensors) == 1:
        return tensors[0]
    total = sum(weights)
    weights = [w / total for w in weights]
    if all(float((t if base is None else t - base).norm()) < eps for t in tensors):
        return tensors[0].clone() if base is None else base.clone()
    vectors = [(t if base is None else t - base).reshape(-1) for t in tensors]
    norms = [float(v.norm()) for v in vectors]
    units = [v / (n + eps) for v, n in zip(vectors, norms)]
    mean = add_all(w * u for w, u in zip(weights, units))
    mean = mean / mean.norm()
    tangent = add_all(w * (u - float((u * mean).sum()) * mean) for w, u in zip(weights, units))
    length = float(tangent.norm()) + eps
    point = math.cos(length) * mean + math.sin(length) / length * tangent
    scale: float = sum(w * n for w, n in zip(weights, norms))
    out: Tensor = (scale * point).reshape(tensors[0].shape)
    return out if base is None else out + base


def karcher(tensors: Sequence[Tensor], max_iter: int, tol: float) -> Tensor:
    """The Karcher mean of the inputs on the unit sphere, equal weights, by mergekit 0.1.5's
    rules: inputs of norm <= tol leave the mean; inputs within angle tol of it leave a step;
    stop before a step shorter than tol."""
    if len(tensors) == 1:
        return tensors[0]
    flat = [t.reshape(-1) for t in tensors]
    norms = [float(v.norm()) for v in flat]
    scale = sum(norms) / len(flat)
    kept = [v / n for v, n in zip(flat, norms) if n > tol]
    if not kept:
        return torch.zeros_like(tensors[0])
    mean = add_all(kept) / len(kept)
    mean = kept[0].clone() if float(mean.norm()) < tol else mean / mean.norm()
    for _ in range(max_iter):
        step = torch.zeros_like(mean)
        for u in kept:
            cos = max(-1.0, min(1.0, float((u * mean).sum())))
            angle = math.acos(cos)
            if angle >= tol:
                step = step + angle / math.sin(angle) / len(kept) * (u - cos * mean)
        size = float(step.norm())
        if size < tol:
            break
        mean = math.cos(size) * mean + math.sin(size) * step / size
        if float(mean.norm()) > tol:
            mean = mean / mean.norm()
    out: Tensor = (scale * mean).reshape(tensors[0].shape)
    return out
