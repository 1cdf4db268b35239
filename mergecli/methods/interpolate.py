"""Two-model interpolation (slerp, nearswap) and Model Stock."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from mergecli.methods.kernels.selection import Selection
from mergecli.methods.kernels.sums import gram_matrix, gram_sums, row_sums
from mergecli.methods.spec import BlockSums, MergeArgs, MethodSpec, ParamSpec

PARALLEL = 0.9995
FUSION_EPS = 1e-8


def slerp(args: MergeArgs) -> torch.Tensor:
    """Spherical interpolation from the base A (t=0) to the other model C (t=1).

    cos = <A/|A|, C/|C|> of the flattened tensors; nearly (anti)parallel tensors
    (|cos| > 0.9995) and zero tensors fall back to linear interpolation.
    """
    assert args.base is not None
    a, c, t = args.base, args.tensors[0], float(args.params["t"])
    sums = args.whole.sums[0]
    norm_a, norm_c = math.sqrt(sums[0]), math.sqrt(sums[1])
    if norm_a == 0 or norm_c == 0:
        return (1 - t) * a + t * c
    cos = sums[2] / (norm_a * norm_c)
    if abs(cos) > PARALLEL:
        return (1 - t) * a + t * c
    theta = math.acos(max(-1.0, min(1.0, cos)))
    sin_theta = math.sin(theta)
    return (math.sin((1 - t) * theta) / sin_theta) * a + (math.sin(t * theta) / sin_theta) * c


def _slerp_sums(args: MergeArgs) -> BlockSums:
    """Per-row sums (accumulated in float64) of A*A, C*C and A*C: norms and dot product."""
    assert args.base is not None
    a, c = args.base, args.tensors[0]
    return BlockSums([[row_sums(a * a), row_sums(c * c), row_sums(a * c)]])


def nearswap(args: MergeArgs) -> torch.Tensor:
    """Move the base A towards C where they are close: w = clamp(t / max(|A - C|, 1e-6), 0, 1)."""
    assert args.base is not None
    a, c, t = args.base, args.tensors[0], float(args.params["t"])
    diff = c - a
    weight = (t / diff.abs().clamp(min=1e-6)).clamp(0, 1)
    return a + weight * diff


def arcee_fusion(args: MergeArgs) -> torch.Tensor:
    """Take C's change where importance = |C - A| * KL(p || q) over the last dimension, with
    p = softmax C + 1e-8 and q = softmax A + 1e-8 (mergekit's smoothing), reaches
    median + 1.5 IQR of all importances; quantiles are lower order statistics of every
    entry, found as exact top-k selections over the whole tensor (`_fusion_counts`; mergekit
    samples a million entries of bigger tensors at random)."""
    assert args.base is not None
    a, c = args.base, args.tensors[0]
    if a.numel() == 0:
        return a.clone()  # no importance to rank
    importance = _importance(args)
    low, median, high = (_order_statistic(importance, s) for s in args.whole.ranked[0])
    return a + (c - a) * (importance >= median + 1.5 * (high - low))


def _importances(args: MergeArgs) -> list[torch.Tensor]:
    return [_importance(args)]


def _importance(args: MergeArgs) -> torch.Tensor:
    """arcee_fusion's importance of each entry (row-local: KL over the last dimension)."""
    assert args.base is not None
    a, c = args.base, args.tensors[0]
    p = torch.softmax(c, dim=-1) + FUSION_EPS
    q = torch.softmax(a, dim=-1) + FUSION_EPS
    return (c - a).abs() * (p * torch.log(p / q)).sum(dim=-1, keepdim=True)


QUARTILES = (0.25, 0.5, 0.75)


def _fusion_counts(params: Mapping[str, Any], numel: int) -> list[int]:
    """The lower q-quantile of n entries (sorted index floor(q (n - 1))) is the k-th largest
    for k = n - floor(q (n - 1))."""
    return [numel - math.floor(q * (numel - 1)) for q in QUARTILES]


def _order_statistic(importance: torch.Tensor, selection: Selection) -> float:
    """The k-th largest importance of a selection; one that keeps all (k = n, only for
    tensors of a few entries, never cut into blocks) is the smallest."""
    if selection.keep == "all":
        return float(importance.min())
    return selection.threshold


def _cosines(deltas: list[torch.Tensor]) -> torch.Tensor:
    """Mean pairwise cosine similarity of each row (the angle of `filter_wise`)."""
    flat = [d.reshape(d.shape[0], -1) for d in deltas]
    sims = []
    for i in range(len(flat)):
        for j in range(i + 1, len(flat)):
            sims.append(torch.nn.functional.cosine_similarity(flat[i], flat[j], dim=-1, eps=1e-8))
    return torch.stack(sims).mean(0)


def _mean_cosine(gram: list[list[float]]) -> float:
    """Mean pairwise cosine of whole task vectors from their dot products (cosine_similarity's
    eps of 1e-8 on the norms)."""
    n = len(gram)
    cosines = [
        gram[i][j] / max(math.sqrt(gram[i][i] * gram[j][j]), 1e-8)
        for i in range(n)
        for j in range(i + 1, n)
    ]
    return math.fsum(cosines) / len(cosines)


def _row_wise(args: MergeArgs) -> bool:
    assert args.base is not None
    return bool(args.params["filter_wise"]) and args.base.dim() >= 2


def model_stock(args: MergeArgs) -> torch.Tensor:
    """t = n c / (1 + (n - 1) c) from the mean pairwise cosine c of the task vectors (over
    the whole tensor, or per row with `filter_wise`); result t * mean(W_i) + (1 - t) * B
    (t = 0 where the denominator is ~0)."""
    assert args.base is not None
    n = len(args.tensors)
    mean = torch.stack(list(args.tensors)).mean(0)
    if not _row_wise(args):
        cos = _mean_cosine(gram_matrix(args.whole.sums))
        denominator = 1 + (n - 1) * cos
        t = 0.0 if abs(denominator) < 1e-8 else n * cos / denominator
        return t * mean + (1 - t) * args.base
    row_cos = _cosines([w - args.base for w in args.tensors])
    row_denominator = 1 + (n - 1) * row_cos
    rows = torch.where(
        row_denominator.abs() < 1e-8, torch.zeros_like(row_cos), n * row_cos / row_denominator
    )
    rows = rows.reshape(-1, *([1] * (args.base.dim() - 1)))
    return rows * mean + (1 - rows) * args.base


def _stock_sums(args: MergeArgs) -> BlockSums:
    """The task vectors' dot products (`gram_sums`) for the whole-tensor cosines (none for
    `filter_wise`, whose rows are in the block)."""
    assert args.base is not None
    if _row_wise(args):
        return BlockSums([[] for _ in args.tensors])
    return BlockSums(gram_sums([w - args.base for w in args.tensors]))


T_PARAM = ParamSpec(
    "t",
    "float",
    "global",
    "interpolation factor: 0 gives the base, 1 the other model",
    required=True,
)

SPECS = (
    MethodSpec(
        "slerp",
        slerp,
        "Spherical linear interpolation between the base and one other model.",
        (T_PARAM,),
        needs_base=True,
        min_models=1,
        max_models=1,
        paper="https://dl.acm.org/doi/10.1145/325165.325242",
        peak_copies=15.0,
        sums=_slerp_sums,
    ),
    MethodSpec(
        "nearswap",
        nearswap,
        "Take the other model's values where they are within t of the base.",
        (
            ParamSpec(
                "t",
                "float",
                "global",
                "distance below which values move to the other model",
                required=True,
                minimum=0.0,
            ),
        ),
        needs_base=True,
        min_models=1,
        max_models=1,
        paper="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
        elementwise=True,
    ),
    MethodSpec(
        "model_stock",
        model_stock,
        "Interpolate the average towards the base by the task vectors' angle.",
        (
            ParamSpec(
                "filter_wise",
                "bool",
                "global",
                "compute the angle per row instead of per tensor",
                default=False,
            ),
        ),
        needs_base=True,
        min_models=2,
        paper="https://arxiv.org/abs/2403.19522",
        sums=_stock_sums,
    ),
    MethodSpec(
        "arcee_fusion",
        arcee_fusion,
        "Take the other model's changes only where they matter most.",
        (),
        needs_base=True,
        min_models=1,
        max_models=1,
        paper="https://www.arcee.ai/blog/meet-mergekit-v0-1-0",
        score=_importances,
        score_topk=_fusion_counts,
    ),
)
