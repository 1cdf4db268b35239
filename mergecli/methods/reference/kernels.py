"""The plain expressions the fast kernels equal: top-k, TIES election and disjoint merge, blocked sums, Bernoulli draws."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from fractions import Fraction

import torch

Tensor = torch.Tensor


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


def add_all(items: Iterable[Tensor]) -> Tensor:
    """Tensors added left to right."""
    listed = list(items)
    out = listed[0]
    for item in listed[1:]:
        out = out + item
    return out
