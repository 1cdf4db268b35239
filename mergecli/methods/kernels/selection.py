"""Exact top-k over a tensor seen in row blocks, so top-k methods can run block by block.

A `Selector` finds the k-th largest magnitude in two passes over the blocks (a histogram of
buckets of 2^16 float32 bit patterns, then of the patterns inside the chosen bucket; a
threshold among the zeros needs neither when the zeros are counted) and tells each block
which entries it keeps: every entry above the threshold, plus the first `equal` entries at
the threshold in flat order, so that exactly k are kept over the tensor, the lowest flat
indices first among ties, as `top_k_mask` does on the whole: equal to
`reference.top_k_mask` (a stable descending sort) over the whole tensor.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

HIGH_BUCKETS = 1 << 15
LOW_BUCKETS = 1 << 16
WINDOW = 3  # buckets pass 0 also counts pattern by pattern, around a predicted one
WINDOW_PAIRS = 4096  # distinct patterns of the window a block may keep (32 KB)
DENSE_BUCKET = 1 / 8  # entries of a bucket holding more of them are counted, not gathered


@dataclass(frozen=True)
class Selection:
    """What one block keeps: entries > `threshold`, and the first `equal` ones equal to it."""

    threshold: float
    equal: int
    keep: str = "some"  # "all" (k >= n) or "none" (k <= 0)
    ties: int = -1  # entries of the block at the threshold (-1: not counted)

    @property
    def every_tie(self) -> bool:
        """Whether the block keeps every entry at the threshold (then the mask is |d| >=
        threshold, with no search for the tied entries)."""
        return self.equal > 0 and self.equal == self.ties

    @property
    def below(self) -> float:
        """The float32 just below the threshold: |d| > below is |d| >= threshold."""
        value = torch.tensor(self.threshold, dtype=torch.float32)
        return float(torch.nextafter(value, torch.tensor(-1.0)))


def select_mask(magnitude: torch.Tensor, selection: Selection) -> torch.Tensor:
    """The boolean keep-mask of one block."""
    if selection.keep == "all":
        return torch.ones_like(magnitude, dtype=torch.bool)
    if selection.keep == "none":
        return torch.zeros_like(magnitude, dtype=torch.bool)
    flat = magnitude.reshape(-1)
    if selection.every_tie:
        return (flat >= selection.threshold).reshape(magnitude.shape)
    mask = flat > selection.threshold
    if selection.equal > 0:
        mask[tied_kept(flat, selection)] = True
    return mask.reshape(magnitude.shape)


def tied_kept(magnitude: torch.Tensor, selection: Selection) -> torch.Tensor:
    """Flat indices of the entries at the threshold that `selection` keeps: the first
    `equal` of them in flat order."""
    flat = magnitude.reshape(-1)
    return torch.nonzero(flat == selection.threshold).reshape(-1)[: selection.equal]


class Selector:
    """Two passes over the same blocks: `count(0, m)` of every block, each given to
    `add(0, j, counts)`; then, if `second_pass()`, `count(1, m)` and `add(1, j, counts)` for
    every block; then `selection(j)` for block j. `count` only reads the selector, so blocks
    can be counted on several threads; `add`, and `bucket_above` after pass 0, are called by
    one thread.

    Bucket b >= 1 holds the bit patterns in [(b - 1) 2^16 + 1, b 2^16] and bucket 0 the
    zeros alone, so a threshold among the zeros (a sparse task vector) needs no second pass.

    `predict(m)` before pass 0, with a sample of the tensor (its first block), makes pass 0
    also count the patterns of the WINDOW buckets around the sample's k-th largest; when
    the tensor's k-th largest falls inside them, the second pass is not needed.
    """

    def __init__(self, k: int, numel: int, blocks: int = 1) -> None:
        self.k, self.numel = k, numel
        self.high = torch.zeros(HIGH_BUCKETS, dtype=torch.int64)
        self.lows: list[torch.Tensor | None] = [None] * blocks
        self.zeros = [0] * blocks
        self._bucket: tuple[int, int] | None = None
        self._dense = False
        self._total: torch.Tensor | None = None
        self._equal: list[int] | None = None
        self._window: int | None = None  # first bucket counted in pass 0
        self._window_lows: list[torch.Tensor | None] = [None] * blocks
        self._covered = False

    def predict(self, sample: torch.Tensor) -> None:
        """Centre pass 0's window on the k-th largest of `sample` (magnitudes of a part of
        the tensor, scaled to its size); a bad guess costs the second pass, never a result."""
        if not 0 < self.k < self.numel or sample.numel() == 0:
            return
        counts = torch.bincount(
            _bucket_keys(sample.reshape(-1).view(torch.int32)), minlength=HIGH_BUCKETS
        )
        scaled = max(1, round(self.k * sample.numel() / self.numel))
        guess = bucket_of(counts, min(scaled, sample.numel()))[0]
        if guess != 0:
            self._window = min(max(1, guess - WINDOW // 2), HIGH_BUCKETS - WINDOW)

    def count(self, pass_no: int, magnitude: torch.Tensor) -> torch.Tensor:
        """What pass `pass_no` learns from one block (non-negative float32 magnitudes): the
        bucket histogram; then the offsets in the chosen bucket of its entries (gathered when
        the bucket is sparse) or their histogram (LOW_BUCKETS counts, when dense)."""
        bits = magnitude.reshape(-1).view(torch.int32)
        if pass_no == 0:
            high = torch.bincount(_bucket_keys(bits), minlength=HIGH_BUCKETS)
            if self._window is None:
                return high
            return torch.cat([high, _clamped_counts(bits, self._window, WINDOW * LOW_BUCKETS)])
        bucket = self.bucket_above()[0]
        start = _bucket_start(bucket)
        if not self._dense:
            return bits[_bucket_keys(bits) == bucket] - start
        # most entries are in the bucket: clamp those below into a bin before it and those
        # above into one after (gathering most entries costs several times a bincount)
        return _clamped_counts(bits, bucket, LOW_BUCKETS)

    def add(self, pass_no: int, block: int, counts: torch.Tensor) -> None:
        """Record block `block`'s histogram of pass `pass_no`."""
        if pass_no == 0:
            self.high.add_(counts[:HIGH_BUCKETS])
            self.zeros[block] = int(counts[0])
            if counts.numel() > HIGH_BUCKETS and self._window is not None:
                pairs = _pairs(counts[HIGH_BUCKETS:])
                if pairs.shape[1] > WINDOW_PAIRS:  # too many patterns to keep per block:
                    self._window, self._window_lows = None, []  # the second pass instead
                else:
                    self._window_lows[block] = pairs
        elif self._dense:
            # the total now, and of this block only the offsets it has (a dense bucket's
            # 65536 counts per block, kept for every block, were most of the peak memory)
            if self._total is None:
                self._total = torch.zeros(LOW_BUCKETS, dtype=torch.int64)
            self._total.add_(counts)
            self.lows[block] = _compact(counts)
        else:
            self.lows[block] = counts

    def observe(self, pass_no: int, block: int, magnitude: torch.Tensor) -> None:
        """`count` and `add` in one step."""
        self.add(pass_no, block, self.count(pass_no, magnitude))

    def settle_zeros(self, zeros: list[int]) -> bool:
        """With each block's count of zero magnitudes (a sparse task vector): when k is at
        least the number of nonzero entries, the threshold is zero and no histogram is
        needed (True); else nothing changes (False)."""
        nonzero = self.numel - sum(zeros)
        if self.k < nonzero:
            return False
        self.zeros, self._bucket = list(zeros), (0, nonzero)
        return True

    @property
    def settled(self) -> bool:
        """True once the bucket of the k-th largest entry is known."""
        return self._bucket is not None

    def bucket_above(self) -> tuple[int, int]:
        """(bucket of the k-th largest entry, entries in higher buckets), after pass 0."""
        if self._bucket is None:
            self._bucket = bucket_of(self.high, self.k)
            self._dense = int(self.high[self._bucket[0]]) > DENSE_BUCKET * self.numel
            self._take_window(self._bucket[0])
        return self._bucket

    def _take_window(self, bucket: int) -> None:
        """When pass 0's window holds `bucket`, its counts are the second pass's."""
        start, found = self._window, self._window_lows
        self._window_lows = []
        if start is None or not start <= bucket < start + WINDOW or bucket == 0:
            return
        low, high = (bucket - start) * LOW_BUCKETS, (bucket - start + 1) * LOW_BUCKETS
        self._total = torch.zeros(LOW_BUCKETS, dtype=torch.int64)
        for block, pairs in enumerate(found):
            assert pairs is not None, "pass 0 counts every block"
            inside = pairs[:, (pairs[0] >= low) & (pairs[0] < high)]
            inside[0] -= low
            self._total.index_add_(0, inside[0].long(), inside[1].long())
            self.lows[block] = inside
        self._dense = self._covered = True  # lows are (offset, count) pairs, as when dense

    def second_pass(self) -> bool:
        """Whether the k-th largest entry needs the second pass (after pass 0)."""
        return 0 < self.k < self.numel and self.bucket_above()[0] != 0 and not self._covered

    def selection(self, block: int) -> Selection:
        """What block `block` keeps (after both passes)."""
        if self.k >= self.numel:
            return Selection(0.0, 0, "all")
        if self.k <= 0:
            return Selection(0.0, 0, "none")
        bucket, above = self.bucket_above()
        missing, equal = self.k - above, self.zeros
        threshold = 0.0
        if bucket != 0:
            lows = [low for low in self.lows if low is not None]
            assert len(lows) == len(self.lows), "the second pass counts every block"
            if self._total is None:
                self._total = torch.zeros(LOW_BUCKETS, dtype=torch.int64)
                for low in lows:
                    self._total += torch.bincount(low, minlength=LOW_BUCKETS)
            offset, greater_in_bucket = bucket_of(self._total, self.k - above)
            pattern = torch.tensor([_bucket_start(bucket) + offset], dtype=torch.int32)
            threshold = float(pattern.view(torch.float32)[0])
            missing -= greater_in_bucket
            if self._equal is None:
                self._equal = [
                    _count_at(low, offset) if self._dense else int((low == offset).sum())
                    for low in lows
                ]
            equal = self._equal
        before, here = sum(equal[:block]), equal[block]
        return Selection(threshold, max(0, min(here, missing - before)), ties=here)


def _clamped_counts(bits: torch.Tensor, bucket: int, bins: int) -> torch.Tensor:
    """Counts of the `bins` bit patterns from bucket `bucket`'s first one; patterns below
    and above are clamped into two extra bins and dropped (one bincount over all entries
    costs less than gathering the ones inside)."""
    keys = torch.sub(bits, _bucket_start(bucket) - 1).clamp_(0, bins + 1)
    return torch.bincount(keys, minlength=bins + 2)[1 : bins + 1]


def _pairs(counts: torch.Tensor) -> torch.Tensor:
    """The nonzero bins of a histogram as int32 (offset, count) pairs."""
    present = torch.nonzero(counts).reshape(-1)
    return torch.stack([present, counts[present]]).to(torch.int32)


def _compact(counts: torch.Tensor) -> torch.Tensor:
    """A block's histogram of a dense bucket as kept until the threshold is known: its
    nonzero bins as (offset, count) pairs, or, when more than a quarter of the bins are
    nonzero and every count fits, all LOW_BUCKETS counts as uint16 (128 KB, a quarter of
    the pairs of a full histogram)."""
    present = int(torch.count_nonzero(counts))
    if present * 4 > LOW_BUCKETS and int(counts.max()) <= 0xFFFF:
        return counts.to(torch.uint16)
    return _pairs(counts)


def _count_at(low: torch.Tensor, offset: int) -> int:
    """The count at `offset` of a block's kept histogram (`_compact`: uint16 counts, or
    (offset, count) pairs)."""
    if low.dim() == 1:
        return int(low[offset])
    hit = torch.nonzero(low[0] == offset).reshape(-1)
    return int(low[1, hit[0]]) if hit.numel() else 0


def zero_count(values: torch.Tensor) -> int:
    """How many entries of a float tensor are zero: the float32 sum of |sign| (three cheap
    passes; exact below 2^24 entries), count_nonzero beyond (4x slower on CPU)."""
    if values.numel() >= 1 << 24:
        return values.numel() - int(torch.count_nonzero(values))
    return values.numel() - int(values.abs().sign_().sum(dtype=torch.float32))


def _bucket_start(bucket: int) -> int:
    """The smallest bit pattern in `bucket` (>= 1)."""
    return ((bucket - 1) << 16) + 1


def _bucket_keys(bits: torch.Tensor) -> torch.Tensor:
    """The bucket of each non-negative int32 bit pattern: the high 16 bits of bits + 0xFFFF,
    on a little-endian machine the odd int16 halves of it, a view (bincount of int16 costs
    about half that of int32)."""
    shifted = bits + 0xFFFF
    if sys.byteorder == "little":
        return shifted.view(torch.int16)[1::2]
    return shifted >> 16


def whole_selection(magnitude: torch.Tensor, k: int) -> Selection:
    """The selection of a whole tensor of non-negative float32 magnitudes (one block)."""
    selector = Selector(k, magnitude.numel())
    selector.observe(0, 0, magnitude)
    if selector.second_pass():
        selector.observe(1, 0, magnitude)
    return selector.selection(0)


def bucket_of(counts: torch.Tensor, k: int) -> tuple[int, int]:
    """(bucket holding the k-th largest entry, number of entries in higher buckets)."""
    from_top = counts.flip(0).cumsum(0)
    position = int(torch.searchsorted(from_top, torch.tensor([k], device=counts.device))[0])
    above = int(from_top[position - 1]) if position > 0 else 0
    return counts.numel() - 1 - position, above
