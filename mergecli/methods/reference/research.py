"""Plain math of the research methods: Consensus (TALL masks), TSV, PCB, WIDEN."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mergecli.methods.reference.geometry import cosine
from mergecli.methods.reference.kernels import Tensor, add_all, keep_count, top_k_mask


def consensus(
    base: Tensor, tensors: Sequence[Tensor], lambdas: Sequence[float], k: int, alpha: float
) -> Tensor:
    """Consensus merging (Wang et al. 2024, eq. 3-5): TALL masks
    m_i = [|d_i| >= lambda_i |d_MTL - d_i|] with d_MTL = sum_i d_i; keep the entries at
    least k masks hold; B + alpha d_MTL there."""
    deltas = [t - base for t in tensors]
    multi = add_all(deltas)
    votes = add_all((d.abs() >= lam * (multi - d).abs()).long() for d, lam in zip(deltas, lambdas))
    return base + alpha * multi * (votes >= k)


def tsv(base: Tensor, tensors: Sequence[Tensor], rank_fraction: float, lam: float) -> Tensor:
    """TSV-Merge (Gargiulo et al. 2025): each task vector's top r singular triplets,
    r = max(1, floor(rank_fraction min(shape) / n)); U and V concatenated and replaced by
    their nearest orthonormal matrices; B + lambda U_perp diag(S) V_perp^T."""
    deltas = [t - base for t in tensors]
    if base.dim() != 2:
        return base + lam * add_all(deltas)
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
        inter = add_all(torch.softmax(_min_max(d[i] * d[j]), dim=0) for j in range(n))
        balance.append(intra * inter)
    k = keep_count(d[0].numel(), ratio)
    kept = [b * top_k_mask(b, k) for b in balance]
    divisor = add_all(kept)
    merged = add_all([b * x for b, x in zip(kept, d)]) / torch.where(divisor == 0, 1.0, divisor)
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
        return base + add_all(w.reshape(base.shape) * d for w, d in zip(weights, deltas))
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
            _ranks(torch.tensor([1 - cosine(x[:, j], base[:, j], 1e-12) for j in columns]))
            for x in tensors
        ]
    )
    weights = (_calibrated(magnitude, t, s) + _calibrated(direction, t, s)) / 2
    return base + add_all(w.unsqueeze(0) * d for w, d in zip(weights, deltas))


def _ranks(scores: Tensor) -> Tensor:
    """Rank of each entry (0 the smallest, ties by position) over (count - 1)."""
    order = torch.sort(scores, stable=True).indices
    ranks = torch.empty(scores.numel(), dtype=torch.float64)
    ranks[order] = torch.arange(scores.numel(), dtype=torch.float64)
    return ranks / max(scores.numel() - 1, 1)


def _calibrated(scores: Tensor, t: float, s: float) -> Tensor:
    shares = torch.softmax(scores, dim=0)
    return torch.where(shares > t * shares.mean(), s, shares)
