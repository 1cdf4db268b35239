"""Interpolation on the unit hypersphere: nuslerp, multislerp, karcher."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from mergecli.methods.kernels.sums import gram_matrix, gram_sums
from mergecli.methods.spec import BlockSums, MergeArgs, MethodSpec, ParamSpec

COLINEAR = 1e-16  # 1 - cos^2 at or below this: interpolate linearly (mergekit's eps^2)


def slerp_vectors(a: torch.Tensor, c: torch.Tensor, t: float, dim: int | None) -> torch.Tensor:
    """Slerp of `a` towards `c` over the whole tensor (dim None) or along `dim`, as
    mergekit's nuslerp: norms clamped at 1e-7, linear only where 1 - cos^2 <= 1e-16."""
    shape = a.shape
    if dim is None:
        a, c = a.reshape(-1), c.reshape(-1)
    elif dim != a.dim() - 1:
        a, c = a.transpose(dim, -1), c.transpose(dim, -1)
    au = a / a.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    cu = c / c.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    cos = (au * cu).sum(dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= COLINEAR
    theta = torch.acos(torch.where(colinear, torch.zeros_like(cos), cos))
    curved = (torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * c) / torch.sin(theta)
    out = torch.where(colinear, (1 - t) * a + t * c, curved)
    if dim is not None and dim != len(shape) - 1:
        out = out.transpose(dim, -1)
    return out.reshape(shape)


def nuslerp(args: MergeArgs) -> torch.Tensor:
    """Slerp between two models (task vectors with a base) at t = w_2 / (w_1 + w_2): of the
    whole tensors as one vector (by their dot products over the whole tensor,
    `_nuslerp_sums`), or of each row (or column, `nuslerp_row_wise`)."""
    t = _nuslerp_t(args)
    x, y = args.tensors
    if args.base is not None:
        x, y = x - args.base, y - args.base
    if _flat(args):
        cx, cy = slerp_coefficients(gram_matrix(args.whole.sums), t)
        out = x * cx + y * cy
    else:
        out = slerp_vectors(x, y, t, 0 if args.params["nuslerp_row_wise"] else x.dim() - 1)
    return out + args.base if args.base is not None else out


def _nuslerp_t(args: MergeArgs) -> float:
    w1, w2 = (float(p["weight"]) for p in args.per_model)
    return 0.5 if abs(w1 + w2) < 1e-6 else w2 / (w1 + w2)


def _flat(args: MergeArgs) -> bool:
    return bool(args.params["nuslerp_flatten"]) or args.tensors[0].dim() < 2


def _nuslerp_sums(args: MergeArgs) -> BlockSums:
    """The two vectors' dot products (`gram_sums`) when the whole tensor is one vector."""
    if not _flat(args):
        return BlockSums([[], []])
    base = args.base
    return BlockSums(gram_sums([t - base if base is not None else t for t in args.tensors]))


def _columns(params: Mapping[str, Any], shape: tuple[int, ...]) -> bool:
    """Column slerps (`nuslerp_row_wise` without flatten) need every row of a column."""
    return bool(params["nuslerp_row_wise"]) and not params["nuslerp_flatten"]


def slerp_coefficients(gram: list[list[float]], t: float) -> tuple[float, float]:
    """(c_a, c_b) of slerp(a, b, t) = c_a a + c_b b from the dot products of a and b, as
    `slerp_vectors` over the whole tensor: norms clamped at 1e-7, linear where
    1 - cos^2 <= 1e-16."""
    norm_a, norm_b = (max(math.sqrt(max(gram[i][i], 0.0)), 1e-7) for i in (0, 1))
    cos = max(-1.0, min(1.0, gram[0][1] / (norm_a * norm_b)))
    if 1 - cos * cos <= COLINEAR:
        return 1 - t, t
    theta = math.acos(cos)
    return math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)


def multislerp(args: MergeArgs) -> torch.Tensor:
    """Barycentric interpolation of n tensors (task vectors with a base) on the hypersphere,
    as mergekit defines it: unit vectors u_i = v_i / (|v_i| + eps), their weighted mean m
    normalised, the tangent t = sum_i w_i (u_i - (u_i . m) m), the point
    m cos|t|' + t sin|t|' / |t|' (|t|' = |t| + eps), times sum_i w_i |v_i|. Two inputs
    whose unit mean vanishes are interpolated linearly. Every vector named is a combination
    of the v_i, so the result is sum_j c_j v_j with c found from the v_i's dot products
    over the whole tensor (`_multislerp_sums`); a block of rows needs only them."""
    if len(args.tensors) == 1:
        return args.tensors[0]
    base = args.base
    vectors = [t - base if base is not None else t for t in args.tensors]
    coefficients = _tangent_mean(gram_matrix(args.whole.sums), _weights(args), args.params)
    out = torch.zeros_like(vectors[0])
    for c, v in zip(coefficients, vectors):
        out.add_(v, alpha=c)
    return out + base if base is not None else out


def _weights(args: MergeArgs) -> list[float]:
    weights = [float(p["weight"]) for p in args.per_model]
    total = sum(weights)
    if args.params["normalize_weights"] and total != 0:
        return [w / total for w in weights]
    return weights


def _multislerp_sums(args: MergeArgs) -> BlockSums:
    """The dot products of the vectors multislerp interpolates (`gram_sums`)."""
    base = args.base
    return BlockSums(gram_sums([t - base if base is not None else t for t in args.tensors]))


def _tangent_mean(
    gram: list[list[float]], weights: Sequence[float], params: Mapping[str, Any]
) -> list[float]:
    """multislerp's result as coefficients of its inputs, from their Gram matrix."""
    eps, n = float(params["eps"]), len(gram)
    norms = [math.sqrt(max(gram[i][i], 0.0)) for i in range(n)]
    if all(norm < eps for norm in norms):
        return [0.0] * n  # every task vector is zero (mergekit raises)
    mean = [w / (norm + eps) for w, norm in zip(weights, norms)]
    size = math.sqrt(max(_quadratic(gram, mean), 0.0))
    if size < eps:
        if n != 2:
            raise ValueError(
                "multislerp: the weighted unit vectors cancel (antipodal inputs with "
                "balancing weights); use other weights"
            )
        return list(weights)
    unit_mean = [c / size for c in mean]
    along = _apply(gram, unit_mean)  # v_i . m
    shift = math.fsum(w * a / (norm + eps) for w, a, norm in zip(weights, along, norms))
    tangent = [c - shift * m for c, m in zip(mean, unit_mean)]
    length = math.sqrt(max(_quadratic(gram, tangent), 0.0)) + eps
    scale = math.fsum(w * norm for w, norm in zip(weights, norms))
    return [
        scale * (m * math.cos(length) + t * math.sin(length) / length)
        for m, t in zip(unit_mean, tangent)
    ]


def _apply(gram: list[list[float]], x: Sequence[float]) -> list[float]:
    return [math.fsum(g * v for g, v in zip(row, x)) for row in gram]


def _quadratic(gram: list[list[float]], x: Sequence[float]) -> float:
    return math.fsum(a * b for a, b in zip(x, _apply(gram, x)))


def karcher(args: MergeArgs) -> torch.Tensor:
    """Karcher mean of the inputs on the unit sphere (equal weights), scaled by the mean norm:
    a combination of the inputs whose coefficients come from their dot products over the
    whole tensor (`karcher_coefficients`; a block of rows needs only them)."""
    n = len(args.tensors)
    if n == 1:
        return args.tensors[0]
    iterations, tol = int(args.params["max_iter"]), float(args.params["tol"])
    gram = gram_matrix(args.whole.sums)
    out = torch.zeros_like(args.tensors[0])
    for c, tensor in zip(karcher_coefficients(gram, [1.0 / n] * n, iterations, tol), args.tensors):
        out.add_(tensor, alpha=c)
    return out


def _karcher_sums(args: MergeArgs) -> BlockSums:
    """The inputs' dot products (`gram_sums`)."""
    return BlockSums(gram_sums(list(args.tensors)))


def karcher_coefficients(
    gram: list[list[float]], weights: Sequence[float], iterations: int, tol: float
) -> list[float]:
    """The weighted Karcher mean as mergekit 0.1.5 computes it, as coefficients c_i of the
    inputs v_i (result sum_i c_i v_i) worked from their Gram matrix in float64: inputs of
    norm <= tol leave the mean (not its scale); start at the normalised weighted mean of the
    unit vectors (the first unit vector if that vanishes); each step sums w_i theta_i /
    sin(theta_i) (u_i - cos_i m) over the inputs at an angle theta_i >= tol, stops before
    moving once that tangent is shorter than tol, else moves along the exponential map."""
    n = len(gram)
    norms = [math.sqrt(max(gram[i][i], 0.0)) for i in range(n)]
    valid = [i for i in range(n) if norms[i] > tol]
    if not valid:
        return [0.0] * n
    units = [[gram[i][j] / (norms[i] * norms[j]) for j in valid] for i in valid]
    total = math.fsum(weights[i] for i in valid)
    alphas = [weights[i] / total for i in valid]
    size = math.sqrt(max(_quadratic(units, alphas), 0.0))
    mean = [1.0] + [0.0] * (len(valid) - 1) if size < tol else [a / size for a in alphas]
    for _ in range(iterations):
        along = _apply(units, mean)
        step = [0.0] * len(valid)
        for k, (alpha, cos) in enumerate(zip(alphas, along)):
            cos = max(-1.0, min(1.0, cos))
            theta = math.acos(cos)
            if theta >= tol:
                factor = alpha * theta / math.sin(theta)
                step = [s - factor * cos * m for s, m in zip(step, mean)]
                step[k] += factor
        length = math.sqrt(max(_quadratic(units, step), 0.0))
        if length < tol:
            break
        mean = [math.cos(length) * m + math.sin(length) * s / length for m, s in zip(mean, step)]
        unit_norm = math.sqrt(max(_quadratic(units, mean), 0.0))
        if unit_norm > tol:
            mean = [m / unit_norm for m in mean]
    scale = math.fsum(w * norm for w, norm in zip(weights, norms))
    coefficients = [0.0] * n
    for k, i in enumerate(valid):
        coefficients[i] = scale * mean[k] / norms[i]
    return coefficients


WEIGHT = ParamSpec("weight", "float", "model", "weight of this model", required=True)

SPECS = (
    MethodSpec(
        "nuslerp",
        nuslerp,
        "Slerp of two models (or task vectors) at t = w2 / (w1 + w2).",
        (
            WEIGHT,
            ParamSpec(
                "nuslerp_flatten",
                "bool",
                "global",
                "slerp the whole tensor as one vector",
                default=True,
            ),
            ParamSpec(
                "nuslerp_row_wise",
                "bool",
                "global",
                "without flatten: slerp columns instead of rows",
                default=False,
            ),
        ),
        optional_base=True,
        min_models=2,
        max_models=2,
        paper="https://github.com/arcee-ai/mergekit",
        sums=_nuslerp_sums,
        whole_when=_columns,
    ),
    MethodSpec(
        "multislerp",
        multislerp,
        "Barycentric interpolation of n models on the hypersphere.",
        (
            WEIGHT,
            ParamSpec(
                "normalize_weights",
                "bool",
                "global",
                "divide the weights by their sum",
                default=True,
            ),
            ParamSpec(
                "eps", "float", "global", "tolerance for zero norms", default=1e-8, minimum=0.0
            ),
        ),
        optional_base=True,
        min_models=2,
        paper="https://github.com/arcee-ai/mergekit",
        sums=_multislerp_sums,
    ),
    MethodSpec(
        "karcher",
        karcher,
        "Riemannian (Karcher) mean of the models on the hypersphere.",
        (
            ParamSpec(
                "max_iter", "int", "global", "most fixed-point iterations", default=10, minimum=1
            ),
            ParamSpec(
                "tol",
                "float",
                "global",
                "stop when the tangent step is this small",
                default=1e-5,
                minimum=0.0,
            ),
        ),
        min_models=2,
        paper="https://en.wikipedia.org/wiki/Karcher_mean",
        sums=_karcher_sums,
    ),
)
