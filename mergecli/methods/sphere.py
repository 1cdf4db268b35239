"""Interpolation on the unit hypersphere: nuslerp, multislerp, karcher."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mergecli.methods.spec import MergeArgs, MethodSpec, ParamSpec

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
    """Slerp between two models (task vectors with a base) at t = w_2 / (w_1 + w_2)."""
    w1, w2 = (float(p["weight"]) for p in args.per_model)
    t = 0.5 if abs(w1 + w2) < 1e-6 else w2 / (w1 + w2)
    x, y = args.tensors
    if args.base is not None:
        x, y = x - args.base, y - args.base
    if args.params["nuslerp_flatten"] or x.dim() < 2:
        dim = None
    else:
        dim = 0 if args.params["nuslerp_row_wise"] else x.dim() - 1
    out = slerp_vectors(x, y, t, dim)
    return out + args.base if args.base is not None else out


def multislerp(args: MergeArgs) -> torch.Tensor:
    """Barycentric interpolation of n tensors (task vectors with a base) on the hypersphere,
    as mergekit defines it: unit vectors u_i = v_i / (|v_i| + eps), their weighted mean m
    normalised, the tangent t = sum_i w_i (u_i - (u_i . m) m), the point
    m cos|t|' + t sin|t|' / |t|' (|t|' = |t| + eps), times sum_i w_i |v_i|. Two inputs
    whose unit mean vanishes are interpolated linearly."""
    if len(args.tensors) == 1:
        return args.tensors[0]
    weights = [float(p["weight"]) for p in args.per_model]
    if args.params["normalize_weights"]:
        total = sum(weights)
        weights = [w / total for w in weights] if total != 0 else weights
    eps = float(args.params["eps"])
    base = args.base
    vectors = [(t - base if base is not None else t).reshape(-1) for t in args.tensors]
    out = _tangent_mean(vectors, weights, eps).reshape(args.tensors[0].shape)
    return out + base if base is not None else out


def _tangent_mean(
    vectors: Sequence[torch.Tensor], weights: Sequence[float], eps: float
) -> torch.Tensor:
    norms = [v.norm() for v in vectors]
    if all(float(n) < eps for n in norms):
        return torch.zeros_like(vectors[0])  # every task vector is zero (mergekit raises)
    units = [v / (n + eps) for v, n in zip(vectors, norms)]
    mean = sum((w * u for w, u in zip(weights, units)), torch.zeros_like(units[0]))
    size = mean.norm()
    if float(size) < eps:
        if len(vectors) != 2:
            raise ValueError(
                "multislerp: the weighted unit vectors cancel (antipodal inputs with "
                "balancing weights); use other weights"
            )
        return weights[0] * vectors[0] + weights[1] * vectors[1]
    mean = mean / size
    tangent = sum(
        (w * (u - (u * mean).sum() * mean) for w, u in zip(weights, units)), torch.zeros_like(mean)
    )
    length = tangent.norm() + eps
    point = mean * torch.cos(length) + tangent * (torch.sin(length) / length)
    scale = sum((w * n for w, n in zip(weights, norms)), torch.zeros((), dtype=mean.dtype))
    result: torch.Tensor = point * scale
    return result


def karcher(args: MergeArgs) -> torch.Tensor:
    """Karcher mean of the inputs on the unit sphere (equal weights), scaled by the mean norm."""
    n = len(args.tensors)
    if n == 1:
        return args.tensors[0]
    vectors = [t.reshape(-1) for t in args.tensors]
    iterations, tol = int(args.params["max_iter"]), float(args.params["tol"])
    return karcher_mean(vectors, [1.0 / n] * n, iterations, tol).reshape(args.tensors[0].shape)


def karcher_mean(
    vectors: Sequence[torch.Tensor], weights: Sequence[float], iterations: int, tol: float
) -> torch.Tensor:
    """The weighted Karcher mean as mergekit 0.1.5 computes it: inputs of norm <= tol leave
    the mean (not its scale); start at the normalised weighted mean of the unit vectors (the
    first unit vector if that vanishes); each step sums w_i theta_i / sin(theta_i) (u_i -
    cos_i m) over the inputs at an angle theta_i >= tol, stops before moving once that
    tangent is shorter than tol, else moves along the exponential map. Angles and norms are
    taken in the inputs' dtype, as there (float32 rounding then matches entry for entry)."""
    norms = [torch.linalg.vector_norm(v) for v in vectors]
    valid = [i for i, norm in enumerate(norms) if float(norm) > tol]
    if not valid:
        return torch.zeros_like(vectors[0])
    total = sum(weights[i] for i in valid)
    alphas = [weights[i] / total for i in valid]
    units = [vectors[i] / norms[i] for i in valid]
    mean = torch.zeros_like(units[0])
    for alpha, unit in zip(alphas, units):
        mean += alpha * unit
    size = torch.linalg.vector_norm(mean)
    mean = units[0].clone() if float(size) < tol else mean / size
    for _ in range(iterations):
        tangent = torch.zeros_like(mean)
        for alpha, unit in zip(alphas, units):
            cos = torch.clamp(torch.dot(mean, unit), -1.0, 1.0)
            theta = torch.arccos(cos)
            if float(theta) >= tol:
                tangent += alpha * (theta / torch.sin(theta)) * (unit - cos * mean)
        length = torch.linalg.vector_norm(tangent)
        if float(length) < tol:
            break
        mean = torch.cos(length) * mean + torch.sin(length) * (tangent / length)
        unit_norm = torch.linalg.vector_norm(mean)
        if float(unit_norm) > tol:
            mean = mean / unit_norm
    scale = sum(w * n for w, n in zip(weights, norms))
    result: torch.Tensor = scale * mean
    return result


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
    ),
)
