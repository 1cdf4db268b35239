"""TIES sign election and disjoint merge without boolean arithmetic (equal to
`reference.ties_merge`, exactly)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def elect_sign(weighted: torch.Tensor) -> torch.Tensor:
    """Majority sign of the summed (weighted) deltas along dim 0: +1 where the sum is >= 0."""
    return torch.where(weighted.sum(0) >= 0, 1.0, -1.0).to(weighted.dtype)


def disjoint_merge(
    deltas: Sequence[torch.Tensor],
    weights: Sequence[float],
    normalize: bool,
    count: bool = False,
) -> torch.Tensor:
    """TIES merge of task vectors d_i with weights w_i, without stacking them: the elected
    sign is that of sum_i w_i d_i (+ where >= 0), or with `count` that of the number of
    positive minus negative w_i d_i; entries of w_i d_i agreeing with it are summed, and
    divided by the sum of their weights if `normalize`. Entries that are exactly zero agree
    with no sign and count in neither sum."""
    sign = _counted_sign(deltas, weights) if count else _elected_sign(deltas, weights)
    merged, divisor = torch.empty_like(sign), torch.empty_like(sign) if normalize else None
    signed_weight, agreeing = torch.empty_like(sign), torch.empty_like(sign)
    for i, (weight, delta) in enumerate(zip(weights, deltas)):
        # s * (w d) is |w d| where w d agrees with s, <= 0 elsewhere: clamped, it is the
        # agreeing magnitude, summed exactly as the signed values would be (the first one
        # is written, not added to zeros: x + 0 = x for every x >= 0 but -0)
        signs = sign if weight == 1 else torch.mul(sign, weight, out=signed_weight)
        term = merged if i == 0 else agreeing
        torch.mul(delta, signs, out=term).clamp_(min=0)
        if i > 0:
            merged.add_(agreeing)
        if divisor is not None:
            _add_weight(divisor, term, weight, first=i == 0)
    merged.mul_(sign)
    if divisor is None:
        return merged
    if all(w > 0 for w in weights):
        # sums of positive weights are 0 or >= the smallest: only the zeros change
        return merged.div_(divisor.clamp_(min=min(weights)))
    return merged.div_(divisor.masked_fill_(divisor == 0, 1.0))


def _add_weight(divisor: torch.Tensor, agreeing: torch.Tensor, weight: float, first: bool) -> None:
    """divisor += weight where `agreeing` (>= 0) is positive; the first model writes it."""
    if first:
        torch.sign(agreeing, out=divisor)
        if weight != 1:
            divisor.mul_(weight)
    else:
        divisor.add_(agreeing.sign_(), alpha=weight)


def _counted_sign(deltas: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """+1.0 where at least as many w_i d_i are positive as negative, else -1.0."""
    total = torch.zeros((), dtype=deltas[0].dtype, device=deltas[0].device)
    for weight, delta in zip(weights, deltas):
        total = total + torch.sign(delta) * math.copysign(1.0, weight) if weight else total
    return torch.copysign(torch.ones((), dtype=deltas[0].dtype, device=deltas[0].device), total)


def _elected_sign(deltas: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """+1.0 where sum_i w_i d_i >= 0, else -1.0. The sum is made as (+0.0 + w_1 d_1) + ...:
    adding finite values to +0.0 never gives -0.0, so copysign sees no negative zero."""
    zero = torch.zeros((), dtype=deltas[0].dtype, device=deltas[0].device)
    total = torch.add(zero, deltas[0], alpha=weights[0])
    for weight, delta in zip(weights[1:], deltas[1:]):
        total.add_(delta, alpha=weight)
    return torch.copysign(torch.ones((), dtype=total.dtype, device=total.device), total)
