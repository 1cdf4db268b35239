"""Exact top-k by magnitude: `keep_count` entries, ties at the threshold lowest index first.

The threshold is found by selection, not sorting (a two-pass radix select on the bits of float32
magnitudes, `torch.kthvalue` otherwise). Equal to `reference.top_k_mask`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mergecli.methods.kernels.selection import Selection, select_mask, tied_kept, whole_selection


def keep_count(numel: int, density: float) -> int:
    """floor(density * n) (up to float noise), at least 1 when density > 0, at most n."""
    if density <= 0 or numel == 0:
        return 0
    return min(numel, max(1, math.floor(density * numel + 1e-9)))


def select_top(magnitude: torch.Tensor, k: int) -> Selection:
    """The selection of the `k` largest entries of a whole tensor of magnitudes (ties:
    lowest flat index first): radix selection for float32, `kthvalue` otherwise."""
    flat = magnitude.reshape(-1)
    n = flat.numel()
    if k >= n:
        return Selection(0.0, 0, "all")
    if k <= 0:
        return Selection(0.0, 0, "none")
    if radix_ready(flat):
        return whole_selection(flat, k)
    if bool(torch.isnan(flat).any()):
        raise ValueError("NaN magnitudes have no top-k (NaN inputs are refused before the math)")
    threshold = torch.kthvalue(flat, n - k + 1).values
    return Selection(float(threshold), k - int((flat > threshold).sum()))


def top_k_mask(magnitude: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of exactly `k` largest entries of `magnitude` (ties: lowest index first)."""
    return select_mask(magnitude, select_top(magnitude, k))


def radix_ready(values: torch.Tensor) -> bool:
    """float32 and non-negative: bit patterns order like the values (radix selection)."""
    return values.dtype == torch.float32 and bool((values >= 0).all())


def kth_largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest entry (1-based) of a flat tensor, exactly."""
    if not radix_ready(values) or k >= values.numel():
        return torch.kthvalue(values, values.numel() - k + 1).values
    return torch.tensor(whole_selection(values, k).threshold, dtype=values.dtype)


def keep_selected(delta: torch.Tensor, selection: Selection) -> torch.Tensor:
    """`delta` with the entries `selection` does not keep zeroed (of its magnitudes)."""
    if selection.keep == "some" and selection.threshold == 0.0:
        return delta  # entries at a zero threshold are zero: the mask changes nothing
    if selection.keep != "some":
        return delta * select_mask(delta, selection)
    # |d| > t kept, others 0, sign restored: three float passes, no boolean arithmetic
    if selection.every_tie:
        return torch.copysign(F.threshold(delta.abs(), selection.below, 0.0), delta)
    kept = torch.copysign(F.threshold(delta.abs(), selection.threshold, 0.0), delta)
    if selection.equal > 0:
        index = tied_kept(delta.abs(), selection)
        kept.reshape(-1)[index] = delta.reshape(-1)[index]
    return kept


def breadcrumbs_counts(n: int, density: float, gamma: float) -> tuple[int, int]:
    """(entries kept before dropping the top, entries dropped from the top)."""
    target = keep_count(n, density) if density < 1 else n
    n_top = min(math.floor(gamma * n + 1e-9), n - target)
    return target + n_top, n_top
