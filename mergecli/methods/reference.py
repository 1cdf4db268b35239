"""The plain math of every method and kernel, as the papers write it (float64, no tricks).

Nothing here is fast and nothing here is used by a merge: each function is the expression a
method or a fast kernel is tested equal to (`tests/methods/test_reference.py`), on random
inputs with ties, zeros and subnormals. Random methods take their keep masks as inputs:
the draws are the Bernoulli kernel's job, whose own reference is `bernoulli_keep`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from fractions import Fraction

import torch

Tensor = torch.Tensor
PARALLEL = 0.9995  # |cos| above which slerp interpolates linearly


# kernels ------------------------------------------------------------------------------


def keep_count(n: int, density: float) -> int:
    """floor(density * n), at least 1 when density > 0, at most n."""
    if density <= 0 or n == 0:
        return 0
    return min(n, max(1, math.floor(density * n + 1e-9)))


def top_k_mask(magnitude: Tensor, k: int) -> Tensor:
    """The k largest entries by a stable descending sort: ties keep the lowest flat index."""
    flat = magnitude.reshape(-1)
    order = torch.sort(flat, descending=True, stable=True).indices
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    mask[order[: max(k, 0)]] = True
    return mask.reshape(magnitude.shape)


def ties_merge(
    deltas: Sequence[Tensor], weights: Sequence[float], normalize: bool, count: bool = False
) -> Tensor:
    """TIES (Yadav et al. 2023, eq. 2-3) on weighted task vectors v_i = w_i d_i: elected sign
    s = sign(sum_i v_i) (+ where the sum is >= 0); an entry of v_i agrees when its sign is s
    (zeros agree with no sign); merged = sum of agreeing v_i, divided by the sum of their
    weights with `normalize` (by 1 where nothing agrees). With `count` the elected sign is
    that of the number of positive minus negative v_i (mergekit's `count`, PEFT's
    `frequency`)."""
    weighted = [w * d for w, d in zip(weights, deltas)]
    total = torch.sign(weighted[0]) if count else weighted[0]
    for v in weighted[1:]:
        total = total + (torch.sign(v) if count else v)
    sign = torch.where(total >= 0, 1.0, -1.0).to(total.dtype)
    merged = torch.zeros_like(total)
    divisor = torch.zeros_like(total)
    for w, v in zip(weights, weighted):
        agree = torch.sign(v) == sign
        merged = merged + torch.where(agree, v, torch.zeros_like(v))
        divisor = divisor + torch.where(agree, torch.full_like(v, w), torch.zeros_like(v))
    if not normalize:
        return merged
    return merged / torch.where(divisor == 0, torch.ones_like(divisor), divisor)


def total(values: Tensor, dtype: torch.dtype = torch.float64) -> float:
    """The sum of a tensor as the blocked kernels define it: each row summed in `dtype`,
    then the row sums added exactly (a 0-D or 1-D tensor is one row)."""
    rows = values.reshape(1, -1) if values.dim() < 2 else values.reshape(values.shape[0], -1)
    return math.fsum(float(row.sum(dtype=dtype)) for row in rows)


def bernoulli_keep(first_bytes: Sequence[int], tie_words: Sequence[int], p: float) -> list[bool]:
    """Keep decisions from a uniform U per entry whose binary digits are its first byte,
    then (for the entries whose byte equals floor(256 p), in entry order) 32 more bits:
    keep iff U < p, compared exactly. `tie_words` are the 32-bit words in the order drawn
    (a second word for an entry only when the first ties again, 2^-32 of the time)."""
    exact, keep, words = Fraction(p), [], iter(tie_words)
    for byte in first_bytes:
        low, width = Fraction(byte, 256), Fraction(1, 256)
        while low <= exact < low + width and exact != low:
            word = next(words)
            low, width = low + width * Fraction(word, 2**32), width / 2**32
        keep.append(low + width <= exact)
    return keep


def _sum(items: Iterable[Tensor]) -> Tensor:
    """Tensors added left to right."""
    listed = list(items)
    out = listed[0]
    for item in listed[1:]:
        out = out + item
    return out


# methods ------------------------------------------------------------------------------


def linear(tensors: Sequence[Tensor], weights: Sequence[float], normalize: bool) -> Tensor:
    """sum_i w_i W_i, divided by sum_i w_i when normalizing and that sum is not 0."""
    out = _sum(w * t for w, t in zip(weights, tensors))
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
    cos = sum(_cosine(deltas[i], deltas[j]) for i, j in pairs) / len(pairs)
    denominator = 1 + (n - 1) * cos
    ratio = 0.0 if abs(denominator) < 1e-8 else n * cos / denominator
    return ratio * (_sum(tensors) / n) + (1 - ratio) * base


def _cosine(x: Tensor, y: Tensor, eps: float = 1e-8) -> float:
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


def spherical_mean(
    vectors: Sequence[Tensor], weights: Sequence[float], steps: int, tol: float, eps: float
) -> Tensor:
    """Weighted Frechet mean on the unit sphere by Riemannian gradient steps from the
    normalised weighted mean of the unit vectors, times the weighted mean norm."""
    norms = [float(v.norm()) for v in vectors]
    units = [v / n if n > eps else torch.zeros_like(v) for v, n in zip(vectors, norms)]
    mean = _sum(w * u for w, u in zip(weights, units))
    if float(mean.norm()) < eps:
        return _sum(w * v for w, v in zip(weights, vectors))
    mean = mean / mean.norm()
    for _ in range(steps):
        tangent = _sum(w * _log(mean, u, eps) for w, u in zip(weights, units))
        size = float(tangent.norm())
        if size >= eps:
            mean = math.cos(size) * mean + math.sin(size) * tangent / size
        mean = mean / mean.norm()
        if size < tol:
            break
    scale: float = sum(w * n for w, n in zip(weights, norms))
    result: Tensor = scale * mean
    return result


def _log(mean: Tensor, unit: Tensor, eps: float) -> Tensor:
    cos = max(-1.0, min(1.0, float((unit * mean).sum())))
    direction = unit - cos * mean
    size = float(direction.norm())
    return torch.zeros_like(mean) if size < eps else math.acos(cos) * direction / size


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
    mean = _sum(w * u for w, u in zip(weights, units))
    mean = mean / mean.norm()
    tangent = _sum(w * (u - float((u * mean).sum()) * mean) for w, u in zip(weights, units))
    length = float(tangent.norm()) + eps
    point = math.cos(length) * mean + math.sin(length) / length * tangent
    scale: float = sum(w * n for w, n in zip(weights, norms))
    out: Tensor = (scale * point).reshape(tensors[0].shape)
    return out if base is None else out + base


def karcher(tensors: Sequence[Tensor], max_iter: int, tol: float) -> Tensor:
    """The Karcher mean of the inputs on the unit sphere, equal weights."""
    n = len(tensors)
    vectors = [t.reshape(-1) for t in tensors]
    return spherical_mean(vectors, [1 / n] * n, max_iter, tol, 1e-12).reshape(tensors[0].shape)


def consensus(
    base: Tensor, tensors: Sequence[Tensor], lambdas: Sequence[float], k: int, alpha: float
) -> Tensor:
    """Consensus merging (Wang et al. 2024, eq. 3-5): TALL masks
    m_i = [|d_i| >= lambda_i |d_MTL - d_i|] with d_MTL = sum_i d_i; keep the entries at
    least k masks hold; B + alpha d_MTL there."""
    deltas = [t - base for t in tensors]
    multi = _sum(deltas)
    votes = _sum((d.abs() >= lam * (multi - d).abs()).long() for d, lam in zip(deltas, lambdas))
    return base + alpha * multi * (votes >= k)


def tsv(base: Tensor, tensors: Sequence[Tensor], rank_fraction: float, lam: float) -> Tensor:
    """TSV-Merge (Gargiulo et al. 2025): each task vector's top r singular triplets,
    r = max(1, floor(rank_fraction min(shape) / n)); U and V concatenated and replaced by
    their nearest orthonormal matrices; B + lambda U_perp diag(S) V_perp^T."""
    deltas = [t - base for t in tensors]
    if base.dim() != 2:
        return base + lam * _sum(deltas)
    r = max(1, int(rank_fraction * min(base.shape) / len(deltas)))
    parts = [torch.linalg.svd(d, full_matrices=False) for d in deltas]
    u = torch.cat([p.U[:, :r] for p in parts], dim=1)
    s = torch.cat([p.S[:r] for p in parts])
    v = torch.cat([p.Vh[:r].T for p in parts], dim=1)
    return base + lam * (_nearest_orthonormal(u) @ torch.diag(s) @ _nearest_orthonormal(v).T)


def _nearest_orthonormal(m: Tensor) -> Tensor:
    p, _, qh = torch.linalg.svd(m, full_matrices=False)
    out: Tensor = p @ qh
    return out


def pcb(base: Tensor, tensors: Sequence[Tensor], ratio: float, lam: float) -> Tensor:
    """PCB-Merging (Du et al. 2024, eq. 2-8) over the flattened task vectors."""
    d = [(t - base).reshape(-1) for t in tensors]
    n = len(d)
    balance = []
    for i in range(n):
        intra = torch.softmax(n * _min_max(d[i] * d[i]), dim=0)
        inter = _sum(torch.softmax(_min_max(d[i] * d[j]), dim=0) for j in range(n))
        balance.append(intra * inter)
    k = keep_count(d[0].numel(), ratio)
    kept = [b * top_k_mask(b, k) for b in balance]
    divisor = _sum(kept)
    merged = _sum([b * x for b, x in zip(kept, d)]) / torch.where(divisor == 0, 1.0, divisor)
    return base + lam * merged.reshape(base.shape)


def _min_max(x: Tensor) -> Tensor:
    span = float(x.max() - x.min())
    return (x - x.min()) / (span if span != 0 else 1.0)


def widen(base: Tensor, tensors: Sequence[Tensor], t: float, s: float) -> Tensor:
    """WIDEN (Yu et al. 2024): per column, magnitude (column norm) and direction scores of
    each model against the base, ranked within the model, softmaxed across models,
    calibrated (shares above t times the mean become s); B + sum_i w_i d_i. Tensors that
    are not 2-D score |d_i| per entry."""
    deltas = [x - base for x in tensors]
    if base.dim() != 2:
        scores = torch.stack([_ranks(d.abs().reshape(-1)) for d in deltas])
        weights = _calibrated(scores, t, s)
        return base + _sum(w.reshape(base.shape) * d for w, d in zip(weights, deltas))
    columns = range(base.shape[1])
    magnitude = torch.stack(
        [
            _ranks(
                torch.tensor([float((x[:, j].norm() - base[:, j].norm()).abs()) for j in columns])
            )
            for x in tensors
        ]
    )
    direction = torch.stack(
        [
            _ranks(torch.tensor([1 - _cosine(x[:, j], base[:, j], 1e-12) for j in columns]))
            for x in tensors
        ]
    )
    weights = (_calibrated(magnitude, t, s) + _calibrated(direction, t, s)) / 2
    return base + _sum(w.unsqueeze(0) * d for w, d in zip(weights, deltas))


def _ranks(scores: Tensor) -> Tensor:
    """Rank of each entry (0 the smallest, ties by position) over (count - 1)."""
    order = torch.sort(scores, stable=True).indices
    ranks = torch.empty(scores.numel(), dtype=torch.float64)
    ranks[order] = torch.arange(scores.numel(), dtype=torch.float64)
    return ranks / max(scores.numel() - 1, 1)


def _calibrated(scores: Tensor, t: float, s: float) -> Tensor:
    shares = torch.softmax(scores, dim=0)
    return torch.where(shares > t * shares.mean(), s, shares)


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
