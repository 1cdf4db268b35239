"""Reinforced Agent Merging (RAM, arXiv 2601.13572) and its tensor-local RAM+ variant.

With task vectors d_i = W_i - B, an entry of d_i is active when |d_i| > epsilon, and c is
the number of models active at an entry. An entry active in one model keeps that model's
value; an entry active in several is their mean over the active ones (no dilution by the
models that left it unchanged). RAM+ (tensor-local) scales each model's unique entries by
lambda_i = 1 + r * clamp(shared_i / unique_i, 0, alpha), from the counts of its shared and
unique active entries in the tensor.
"""

from __future__ import annotations

import torch

from mergecli.methods.kernels.sums import row_sums
from mergecli.methods.spec import BlockSums, MergeArgs, MethodSpec, ParamSpec

PAPER = "https://arxiv.org/abs/2601.13572"


def _active(args: MergeArgs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(task vectors stacked, which entries are active, active models per entry)."""
    assert args.base is not None
    deltas = torch.stack([t - args.base for t in args.tensors])
    active = deltas.abs() > float(args.params["epsilon"])
    return deltas, active, active.sum(dim=0)


def ram(args: MergeArgs) -> torch.Tensor:
    """B + sum_i d_i [active_i] / max(c, 1): unique entries whole, shared ones averaged."""
    assert args.base is not None
    deltas, active, count = _active(args)
    merged = (deltas * active).sum(dim=0) / count.clamp(min=1)
    return args.base + merged


def ramplus_tl(args: MergeArgs) -> torch.Tensor:
    """RAM with each model's unique entries scaled by its lambda_i (see the module doc); the
    counts of shared and unique entries are over the whole tensor (`_ramplus_counts`)."""
    assert args.base is not None
    deltas, active, count = _active(args)
    unique, shared = active & (count == 1), active & (count > 1)
    counts = torch.tensor(args.whole.sums, dtype=torch.float64).reshape(-1, 2)
    n_shared, n_unique = counts[:, 0].to(deltas.dtype), counts[:, 1].to(deltas.dtype)
    epsilon = float(args.params["epsilon"])
    rho = n_shared / n_unique.clamp(min=epsilon)
    lam = 1 + float(args.params["r"]) * rho.clamp(min=0, max=float(args.params["alpha"]))
    scale = lam.reshape(-1, *([1] * (deltas.dim() - 1)))
    merged = (deltas * unique * scale).sum(dim=0) + (deltas * shared).sum(dim=0) / count.clamp(
        min=1
    )
    return args.base + merged


def _ramplus_counts(args: MergeArgs) -> BlockSums:
    """Per model, per-row counts of its shared and of its unique active entries (exact:
    whole numbers in float64)."""
    _, active, count = _active(args)
    unique, shared = active & (count == 1), active & (count > 1)
    return BlockSums([[row_sums(s.double()), row_sums(u.double())] for s, u in zip(shared, unique)])


EPSILON = ParamSpec(
    "epsilon",
    "float",
    "global",
    "magnitude above which a task-vector entry counts as changed",
    default=1e-5,
    minimum=0.0,
)

SPECS = (
    MethodSpec(
        "ram",
        ram,
        "Keep entries one model changed; average the ones several changed (over those).",
        (EPSILON,),
        needs_base=True,
        paper=PAPER,
        elementwise=True,
    ),
    MethodSpec(
        "ramplus_tl",
        ramplus_tl,
        "RAM with each model's unique changes scaled up by how much it shares (per tensor).",
        (
            EPSILON,
            ParamSpec("r", "float", "global", "strength of the unique-entry scaling", default=0.1),
            ParamSpec(
                "alpha",
                "float",
                "global",
                "cap of the shared/unique ratio",
                default=0.2,
                minimum=0.0,
            ),
        ),
        needs_base=True,
        paper=PAPER,
        sums=_ramplus_counts,
        sums_vouch=False,
    ),
)
