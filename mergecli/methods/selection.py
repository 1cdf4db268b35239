"""Exact top-k over a tensor seen in row blocks, so top-k methods can run block by block.

A `Selector` finds the k-th largest magnitude in two passes over the blocks (a histogram of
the high 16 bits of the float32 bit patterns, then of the low 16 bits inside the chosen
bucket) and tells each block which entries it keeps: every entry above the threshold, plus
the first `equal` entries at the threshold in flat order, so that exactly k are kept over
the tensor, the lowest flat indices first among ties, as `top_k_mask` does on the whole.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

HIGH_BUCKETS = 1 << 15
LOW_BUCKETS = 1 << 16


@dataclass(frozen=True)
class Selection:
    """What one block keeps: entries > `threshold`, and the first `equal` ones equal to it."""

    threshold: float
    equal: int
    keep: str = "some"  # "all" (k >= n) or "none" (k <= 0)


def select_mask(magnitude: torch.Tensor, selection: Selection) -> torch.Tensor:
    """The boolean keep-mask of one block."""
    if selection.keep == "all":
        return torch.ones_like(magnitude, dtype=torch.bool)
    if selection.keep == "none":
        return torch.zeros_like(magnitude, dtype=torch.bool)
    flat = magnitude.reshape(-1)
    mask = flat > selection.threshold
    if selection.equal > 0:
        tied = torch.nonzero(flat == selection.threshold).reshape(-1)[: selection.equal]
        mask[tied] = True
    return mask.reshape(magnitude.shape)


class Selector:
    """Two passes over the same blocks in the same order: `observe(0, m)` for every block,
    `observe(1, m)` for every block, then `selection(j)` for block j."""

    def __init__(self, k: int, numel: int, blocks: int = 1) -> None:
        self.k, self.numel = k, numel
        self.high: torch.Tensor | None = None
        # allocated up front: small tensors made between block temporaries pin the heap
        self.lows = torch.zeros(blocks, LOW_BUCKETS, dtype=torch.int32)
        self.seen = 0
        self.bucket, self.above = 0, 0
        self._total: torch.Tensor | None = None
        self._equal: list[int] | None = None

    def observe(self, pass_no: int, magnitude: torch.Tensor) -> None:
        """Feed one block of non-negative float32 magnitudes."""
        bits = magnitude.reshape(-1).view(torch.int32)
        if pass_no == 0:
            counts = torch.bincount(bits >> 16, minlength=HIGH_BUCKETS)
            self.high = counts if self.high is None else self.high.add_(counts)
            return
        if self.seen == 0:
            assert self.high is not None, "pass 0 comes first"
            self.bucket, self.above = bucket_of(self.high, self.k)
        self.lows[self.seen] = _low_histogram(bits, self.bucket)
        self.seen += 1

    def selection(self, block: int) -> Selection:
        """What block `block` keeps (after both passes)."""
        if self.k >= self.numel:
            return Selection(0.0, 0, "all")
        if self.k <= 0:
            return Selection(0.0, 0, "none")
        if self._total is None:
            self._total = self.lows.to(torch.int64).sum(0)
        offset, greater_in_bucket = bucket_of(self._total, self.k - self.above)
        pattern = torch.tensor([(self.bucket << 16) | offset], dtype=torch.int32)
        threshold = float(pattern.view(torch.float32)[0])
        missing = self.k - self.above - greater_in_bucket
        if self._equal is None:
            self._equal = [int(low[offset]) for low in self.lows]
        before, here = sum(self._equal[:block]), self._equal[block]
        return Selection(threshold, max(0, min(here, missing - before)))


def _low_histogram(bits: torch.Tensor, bucket: int) -> torch.Tensor:
    """Histogram of the low 16 bits of the entries whose high 16 bits are `bucket`: entries
    below the bucket are clamped into an extra bin before it, those above into one after
    (no gathering: boolean indexing costs several times a bincount)."""
    keys = torch.sub(bits, (bucket << 16) - 1).clamp_(0, LOW_BUCKETS + 1)
    counts = torch.bincount(keys, minlength=LOW_BUCKETS + 2)
    return counts[1 : LOW_BUCKETS + 1].to(torch.int32)


def whole_selection(magnitude: torch.Tensor, k: int) -> Selection:
    """The selection of a whole tensor of non-negative float32 magnitudes (one block)."""
    selector = Selector(k, magnitude.numel())
    selector.observe(0, magnitude)
    selector.observe(1, magnitude)
    return selector.selection(0)


def bucket_of(counts: torch.Tensor, k: int) -> tuple[int, int]:
    """(bucket holding the k-th largest entry, number of entries in higher buckets)."""
    from_top = counts.flip(0).cumsum(0)
    position = int(torch.searchsorted(from_top, torch.tensor([k], device=counts.device))[0])
    above = int(from_top[position - 1]) if position > 0 else 0
    return counts.numel() - 1 - position, above
