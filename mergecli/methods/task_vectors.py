"""Task-vector methods: task arithmetic, TIES, DARE, breadcrumbs.

Each method is: d_i = W_i - B; sparsify each d_i; weight; combine (a plain weighted sum,
or TIES sign election with a disjoint merge); result B + lambda * m.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import torch

from mergecli.methods.dropout import dare_drop, dare_keep, magprune, magprune_probabilities
from mergecli.methods.kernels.bernoulli import bernoulli_keep, pack_bits, unpack_bits
from mergecli.methods.kernels.selection import select_mask
from mergecli.methods.kernels.sign import disjoint_merge, elect_sign
from mergecli.methods.kernels.sums import l1_factor, row_sums
from mergecli.methods.kernels.topk import (
    breadcrumbs_counts,
    keep_count,
    keep_selected,
)
from mergecli.methods.spec import BlockSums, MergeArgs, MethodSpec, ParamSpec

Sparsify = Callable[[MergeArgs, int, torch.Tensor], torch.Tensor]


def _deltas(args: MergeArgs) -> Iterator[torch.Tensor]:
    """Each task vector W_i - B, made when asked (one at a time if consumed one at a time)."""
    assert args.base is not None, "task-vector methods need a base"
    return (t - args.base for t in args.tensors)


def _combine(args: MergeArgs, deltas: list[torch.Tensor], elect: bool) -> torch.Tensor:
    assert args.base is not None
    weights = [float(p["weight"]) for p in args.per_model]
    normalize = bool(args.params["normalize"])
    if elect:
        count = args.params.get("consensus_method") == "count"
        merged = disjoint_merge(deltas, weights, normalize, count)
    else:
        merged = torch.zeros_like(args.base)
        for weight, delta in zip(weights, deltas):
            merged.add_(delta, alpha=weight)
        total = sum(weights)
        if normalize and total != 0:
            merged.div_(total)
    return merged.mul_(float(args.params["lambda"])).add_(args.base)


def _no_sparsify(args: MergeArgs, i: int, delta: torch.Tensor) -> torch.Tensor:
    return delta


def _magnitude(args: MergeArgs, i: int, delta: torch.Tensor) -> torch.Tensor:
    chosen = args.whole.selections[i]
    return keep_selected(delta, chosen[0]) if chosen else delta


def _magnitude_counts(params: Mapping[str, Any], model: Mapping[str, Any], numel: int) -> list[int]:
    density = float(model["density"])
    return [] if density >= 1 else [keep_count(numel, density)]


def _dare(args: MergeArgs, i: int, delta: torch.Tensor) -> torch.Tensor:
    density = float(args.per_model[i]["density"])
    if density >= 1:
        return delta
    sums, kept_bits = args.whole.sums, args.whole.kept
    norms = (sums[i][0], sums[i][1]) if sums and sums[i] else None
    rescale, mode = bool(args.params["rescale"]), str(args.params["rescale_mode"])
    packed = kept_bits[i] if kept_bits else None
    if packed is not None and norms is not None and rescale and mode == "l1":
        # the rescale rides on the mask: d * (m f) is (d m) f bit for bit, as m is 0 or 1
        mask = unpack_bits(packed, delta.numel(), l1_factor(norms), delta.dtype)
        return dare_keep(delta, mask, in_place=True)
    # `delta` is this call's own; the L1 rescale of a whole tensor still needs it unmasked
    in_place = norms is not None or not (rescale and mode == "l1")
    kept = _dare_kept(args, i, delta, in_place, packed)
    return dare_drop(delta, kept, density, rescale, mode, norms)


def _dare_kept(
    args: MergeArgs, i: int, delta: torch.Tensor, in_place: bool, packed: torch.Tensor | None
) -> torch.Tensor:
    """Model i's task vector (or block of it) with DARE's random drop applied (`packed`:
    the keep bits of the statistics pass when it drew them)."""
    if packed is not None:
        mask = unpack_bits(packed, delta.numel())
    else:
        mask = _float_mask(_dare_draws(args, i, delta.numel()))
    return dare_keep(delta, mask, in_place)


def _dare_draws(args: MergeArgs, i: int, numel: int) -> np.ndarray:
    """Model i's keep mask (bool) for this block: one exact Bernoulli(density) per entry."""
    density = float(args.per_model[i]["density"])
    return bernoulli_keep(numel, args.offset, args.seed, args.name, i, density)


def _float_mask(keep: np.ndarray) -> torch.Tensor:
    # numpy casts bool to float32 about 9x faster than torch does
    return torch.from_numpy(keep.astype(np.float32))


def _dare_sums(args: MergeArgs) -> BlockSums:
    """Per model, per-row L1 norms of its task vector and of the kept entries in this block
    (what the L1 rescale needs over the whole tensor), and the keep bits, drawn once."""
    assert args.base is not None
    sums: list[list[torch.Tensor]] = []
    kept: list[torch.Tensor | None] = []
    l1 = bool(args.params["rescale"]) and args.params["rescale_mode"] == "l1"
    for i, tensor in enumerate(args.tensors):
        if float(args.per_model[i]["density"]) >= 1 or not l1:
            sums.append([])
            kept.append(None)
            continue
        magnitude = (tensor - args.base).abs_()
        draws = _dare_draws(args, i, magnitude.numel())
        work = magnitude.dtype  # as `dare_norms`
        keep = _float_mask(draws).reshape(magnitude.shape).to(magnitude.device, work)
        sums.append([row_sums(magnitude, work), row_sums(magnitude.mul_(keep), work)])
        kept.append(pack_bits(torch.from_numpy(draws)))
    return BlockSums(sums, kept)


def _breadcrumbs(args: MergeArgs, i: int, delta: torch.Tensor) -> torch.Tensor:
    magnitude = delta.abs()
    upto, top = (select_mask(magnitude, s) for s in args.whole.selections[i])
    return delta * (upto & ~top)


def _breadcrumbs_counts(
    params: Mapping[str, Any], model: Mapping[str, Any], numel: int
) -> list[int]:
    return list(breadcrumbs_counts(numel, float(model["density"]), float(model["gamma"])))


def _della(args: MergeArgs, i: int, delta: torch.Tensor) -> torch.Tensor:
    if delta.numel() == 0:
        return delta  # no entry to rank or draw
    sums, kept_bits = args.whole.sums, args.whole.kept
    packed = kept_bits[i] if kept_bits else None
    if packed is not None and sums[i]:  # the L1 rescale, with the statistics pass's draws
        mask = unpack_bits(packed, delta.numel(), l1_factor((sums[i][0], sums[i][1])), delta.dtype)
        return dare_keep(delta, mask, in_place=True)
    probs, keep = _magprune_draws(args, i, delta)
    rescale = bool(args.params["rescale"])
    return magprune(delta, probs, torch.from_numpy(keep), rescale)


def _magprune_draws(
    args: MergeArgs, i: int, delta: torch.Tensor
) -> tuple[torch.Tensor, np.ndarray]:
    """Model i's MagPrune keep probabilities (ranked per row) and keep draws for `delta`."""
    density, epsilon = float(args.per_model[i]["density"]), float(args.per_model[i]["epsilon"])
    probs = magprune_probabilities(delta, density, epsilon)
    keep = bernoulli_keep(delta.numel(), args.offset, args.seed, args.name, i, probs.cpu().numpy())
    return probs, keep


def _della_sums(args: MergeArgs) -> BlockSums:
    """For the L1 rescale: per model, per-row L1 norms of its task vector and of the entries
    MagPrune keeps in this block, and the keep bits (drawn here once, reused by the merge)."""
    assert args.base is not None
    n = len(args.tensors)
    if not (bool(args.params["rescale"]) and args.params["rescale_mode"] == "l1"):
        return BlockSums([[] for _ in range(n)], [None] * n)
    sums: list[list[torch.Tensor]] = []
    kept: list[torch.Tensor | None] = []
    for i, tensor in enumerate(args.tensors):
        delta = tensor - args.base
        if delta.numel() == 0:  # no entry to rank or draw
            sums.append([])
            kept.append(None)
            continue
        _, keep = _magprune_draws(args, i, delta)
        work = delta.dtype
        mask = _float_mask(keep).reshape(delta.shape).to(delta.device, work)
        magnitude = delta.abs_()
        sums.append([row_sums(magnitude, work), row_sums(magnitude.mul_(mask), work)])
        kept.append(pack_bits(torch.from_numpy(keep)))
    return BlockSums(sums, kept)


def _method(sparsify: Sparsify, elect: bool) -> Callable[[MergeArgs], torch.Tensor]:
    def merge(args: MergeArgs) -> torch.Tensor:
        deltas = [sparsify(args, i, d) for i, d in enumerate(_deltas(args))]
        return _combine(args, deltas, elect)

    return merge


task_arithmetic = _method(_no_sparsify, elect=False)
ties = _method(_magnitude, elect=True)
dare_linear = _method(_dare, elect=False)
dare_ties = _method(_dare, elect=True)
breadcrumbs = _method(_breadcrumbs, elect=False)
breadcrumbs_ties = _method(_breadcrumbs, elect=True)
della = _method(_della, elect=True)
della_linear = _method(_della, elect=False)


def sce(args: MergeArgs) -> torch.Tensor:
    """SCE: select positions of highest variance across models (`select_topk` of them over
    the whole tensor), weight each task vector by its share of the squared magnitude kept
    (over the whole tensor, `_sce_sums`), keep entries agreeing with the elected sign."""
    assert args.base is not None
    stacked = _sce_selected(args)
    energy = [math.fsum(model) for model in args.whole.sums]
    total = math.fsum(energy)
    weights = [e / total if total > 0 else 0.0 for e in energy]
    w = torch.tensor(weights, dtype=stacked.dtype, device=stacked.device)
    w = w.reshape(-1, *([1] * (stacked.dim() - 1)))
    agree = (torch.sign(stacked) == elect_sign(stacked)).to(stacked.dtype)
    divisor = (w * agree).sum(0)
    merged = (w * agree * stacked).sum(0) / torch.where(
        divisor == 0, torch.ones_like(divisor), divisor
    )
    return args.base + merged


def _sce_variance(args: MergeArgs) -> list[torch.Tensor]:
    """The variance across models of each task-vector entry (SCE's selection score)."""
    return [_variance(torch.stack(list(_deltas(args))))]


def _variance(stacked: torch.Tensor) -> torch.Tensor:
    """Population variance over dim 0: the mean of squared deviations from the mean, two
    passes (torch's `var` over a short outer dim is about 15x slower on CPU)."""
    mean = stacked.sum(0).div_(stacked.shape[0])
    total = torch.zeros_like(mean)
    for row in stacked:
        total.add_((row - mean).square_())
    return total.div_(stacked.shape[0])


def _sce_counts(params: Mapping[str, Any], numel: int) -> list[int]:
    fraction = float(params["select_topk"])
    return [keep_count(numel, fraction)] if fraction < 1 else []


def _sce_selected(args: MergeArgs) -> torch.Tensor:
    """The task vectors stacked, zero outside the selected highest-variance positions."""
    stacked = torch.stack(list(_deltas(args)))
    ranked = args.whole.ranked
    if ranked:
        stacked.mul_(select_mask(_variance(stacked), ranked[0][0]))
    return stacked


def _sce_sums(args: MergeArgs) -> BlockSums:
    """Per model, per-row sums (float64) of its selected task vector's squares."""
    return BlockSums([[row_sums(d.double().square())] for d in _sce_selected(args)])


def _della_check(params: Mapping[str, Any], model: Mapping[str, Any]) -> str | None:
    density, epsilon = float(model["density"]), float(model["epsilon"])
    if density - epsilon <= 0 or density + epsilon > 1:
        return (
            f"density {density} with epsilon {epsilon} gives keep probabilities "
            f"[{density - epsilon:g}, {density + epsilon:g}]; both must lie in (0, 1]"
        )
    return None


WEIGHT = ParamSpec("weight", "float", "model", "weight of this model's task vector", required=True)
DENSITY = ParamSpec(
    "density",
    "float",
    "model",
    "fraction of the task vector kept",
    default=1.0,
    minimum=0.0,
    maximum=1.0,
)
LAMBDA = ParamSpec("lambda", "float", "global", "scale of the merged task vector", default=1.0)
GAMMA = ParamSpec(
    "gamma",
    "float",
    "model",
    "fraction of largest-magnitude entries dropped",
    default=0.01,
    minimum=0.0,
    maximum=1.0,
)
RESCALE = ParamSpec(
    "rescale", "bool", "global", "rescale kept entries after the random drop", default=True
)
RESCALE_MODE = ParamSpec(
    "rescale_mode",
    "str",
    "global",
    "l1: keep each task vector's L1 norm (mergekit); inverse_density: divide by density (paper)",
    default="l1",
    choices=("l1", "inverse_density"),
)
INT8_MASK = ParamSpec(
    "int8_mask",
    "bool",
    "global",
    "accepted for mergekit recipes; a memory detail, no effect",
    default=False,
)


CONSENSUS = ParamSpec(
    "consensus_method",
    "str",
    "global",
    "sign election: sum (of the weighted task vectors, TIES) or count (of their signs: "
    "mergekit's count, PEFT's frequency)",
    default="sum",
    choices=("sum", "count"),
)


def _normalize(default: bool) -> ParamSpec:
    return ParamSpec(
        "normalize", "bool", "global", "divide by the (agreeing) weights' sum", default=default
    )


TA_PAPER = "https://arxiv.org/abs/2212.04089"
TIES_PAPER = "https://arxiv.org/abs/2306.01708"
DARE_PAPER = "https://arxiv.org/abs/2311.03099"
BREADCRUMBS_PAPER = "https://arxiv.org/abs/2312.06795"
DELLA_PAPER = "https://arxiv.org/abs/2406.11617"
EPSILON = ParamSpec(
    "epsilon",
    "float",
    "model",
    "spread of keep probabilities around density",
    default=0.15,
    minimum=0.0,
    maximum=1.0,
)

SPECS = (
    MethodSpec(
        "task_arithmetic",
        task_arithmetic,
        "Base plus the weighted sum of task vectors.",
        (WEIGHT, LAMBDA, _normalize(False)),
        needs_base=True,
        paper=TA_PAPER,
        peak_copies=5.0,
        elementwise=True,
    ),
    MethodSpec(
        "ties",
        ties,
        "Trim task vectors by magnitude, elect signs, merge the agreeing entries.",
        (WEIGHT, DENSITY, LAMBDA, _normalize(True), INT8_MASK, CONSENSUS),
        needs_base=True,
        paper=TIES_PAPER,
        peak_copies=8.0,
        topk=_magnitude_counts,
    ),
    MethodSpec(
        "dare_linear",
        dare_linear,
        "Randomly drop task-vector entries and rescale, then add.",
        (WEIGHT, DENSITY, LAMBDA, _normalize(False), RESCALE, RESCALE_MODE, INT8_MASK),
        needs_base=True,
        random=True,
        paper=DARE_PAPER,
        peak_copies=11.5,
        sums=_dare_sums,
        kept_bits=True,
    ),
    MethodSpec(
        "dare_ties",
        dare_ties,
        "DARE drop and rescale, then TIES sign election and disjoint merge.",
        (WEIGHT, DENSITY, LAMBDA, _normalize(False), RESCALE, RESCALE_MODE, INT8_MASK, CONSENSUS),
        needs_base=True,
        random=True,
        paper=DARE_PAPER,
        peak_copies=11.5,
        sums=_dare_sums,
        kept_bits=True,
    ),
    MethodSpec(
        "breadcrumbs",
        breadcrumbs,
        "Drop the largest outliers and the smallest entries, then add.",
        (WEIGHT, DENSITY, GAMMA, LAMBDA, _normalize(False)),
        needs_base=True,
        paper=BREADCRUMBS_PAPER,
        topk=_breadcrumbs_counts,
    ),
    MethodSpec(
        "breadcrumbs_ties",
        breadcrumbs_ties,
        "Breadcrumbs mask, then TIES sign election and disjoint merge.",
        (WEIGHT, DENSITY, GAMMA, LAMBDA, _normalize(False), INT8_MASK, CONSENSUS),
        needs_base=True,
        paper=BREADCRUMBS_PAPER,
        topk=_breadcrumbs_counts,
    ),
    MethodSpec(
        "della",
        della,
        "MagPrune (magnitude-ranked random drop) and rescale, then TIES sign election.",
        (
            WEIGHT,
            DENSITY,
            EPSILON,
            LAMBDA,
            _normalize(True),
            RESCALE,
            RESCALE_MODE,
            INT8_MASK,
            CONSENSUS,
        ),
        needs_base=True,
        random=True,
        paper=DELLA_PAPER,
        check=_della_check,
        sums=_della_sums,
        kept_bits=True,
        chunk_aligned=True,
    ),
    MethodSpec(
        "della_linear",
        della_linear,
        "MagPrune and rescale, then a weighted sum of task vectors.",
        (WEIGHT, DENSITY, EPSILON, LAMBDA, _normalize(False), RESCALE, RESCALE_MODE, INT8_MASK),
        needs_base=True,
        random=True,
        paper=DELLA_PAPER,
        check=_della_check,
        sums=_della_sums,
        kept_bits=True,
        chunk_aligned=True,
    ),
    MethodSpec(
        "sce",
        sce,
        "Select high-variance positions, calculate weights, erase sign conflicts.",
        (
            ParamSpec(
                "select_topk",
                "float",
                "global",
                "fraction of positions kept by variance across models",
                default=1.0,
                minimum=0.0,
                maximum=1.0,
                exclusive_minimum=True,
            ),
            INT8_MASK,
        ),
        needs_base=True,
        paper="https://arxiv.org/abs/2408.07990",
        score=_sce_variance,
        score_topk=_sce_counts,
        sums=_sce_sums,
    ),
)
