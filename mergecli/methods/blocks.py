"""Building blocks shared by the task-vector methods: sparsification, sign election,
disjoint merge, and per-tensor random generators.

Top-k is exact: `keep_count` entries are kept, chosen by magnitude with a threshold found
by selection, not sorting (a two-pass radix select on the bits of float32 magnitudes,
`torch.kthvalue` otherwise); entries tied at the threshold are kept in order of their flat
index (lowest first), so the result is deterministic.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from mergecli.methods.selection import Selection, select_mask, tied_kept, whole_selection


def keep_count(numel: int, density: float) -> int:
    """floor(density * n) (up to float noise), at least 1 when density > 0, at most n."""
    if density <= 0 or numel == 0:
        return 0
    return min(numel, max(1, math.floor(density * numel + 1e-9)))


def top_k_mask(magnitude: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of exactly `k` largest entries of `magnitude` (ties: lowest index first)."""
    flat = magnitude.reshape(-1)
    n = flat.numel()
    if k >= n:
        return torch.ones_like(magnitude, dtype=torch.bool)
    if k <= 0:
        return torch.zeros_like(magnitude, dtype=torch.bool)
    if radix_ready(flat):
        return select_mask(magnitude, whole_selection(flat, k))
    threshold = torch.kthvalue(flat, n - k + 1).values
    mask = flat > threshold
    missing = k - int(mask.sum())
    if missing > 0:
        tied = torch.nonzero(flat == threshold).reshape(-1)[:missing]
        mask[tied] = True
    return mask.reshape(magnitude.shape)


def radix_ready(values: torch.Tensor) -> bool:
    """float32 and non-negative: bit patterns order like the values (radix selection)."""
    return values.dtype == torch.float32 and bool((values >= 0).all())


def kth_largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest entry (1-based) of a flat tensor, exactly."""
    if not radix_ready(values) or k >= values.numel():
        return torch.kthvalue(values, values.numel() - k + 1).values
    return torch.tensor(whole_selection(values, k).threshold, dtype=values.dtype)


def magnitude_sparsify(delta: torch.Tensor, density: float) -> torch.Tensor:
    """TIES trim: keep the `keep_count` entries of largest magnitude, zero the rest."""
    if density >= 1:
        return delta
    magnitude, k = delta.abs(), keep_count(delta.numel(), density)
    if magnitude.dtype != torch.float32 or k in (0, delta.numel()):
        return delta * top_k_mask(magnitude, k)
    return keep_selected(delta, whole_selection(magnitude, k))


def keep_selected(delta: torch.Tensor, selection: Selection) -> torch.Tensor:
    """`delta` with the entries `selection` does not keep zeroed (of its magnitudes)."""
    if selection.keep == "some" and selection.threshold == 0.0:
        return delta  # entries at a zero threshold are zero: the mask changes nothing
    if selection.keep != "some":
        return delta * select_mask(delta, selection)
    # |d| > t kept, others 0, sign restored: three float passes, no boolean arithmetic
    kept = torch.copysign(F.threshold(delta.abs(), selection.threshold, 0.0), delta)
    if selection.equal > 0:
        index = tied_kept(delta.abs(), selection)
        kept.reshape(-1)[index] = delta.reshape(-1)[index]
    return kept


def rescale_l1(
    original: torch.Tensor, kept: torch.Tensor, norms: tuple[float, float] | None = None
) -> torch.Tensor:
    """Scale `kept` in place so its L1 norm equals `original`'s (unchanged when either is
    ~0); `norms` = (|original|_1, |kept|_1) over the whole tensor when these are a block."""
    factor = l1_factor(norms if norms is not None else dare_norms(original, kept))
    return kept if factor == 1 else kept.mul_(factor)


def l1_factor(norms: tuple[float, float]) -> float:
    """|original|_1 / |kept|_1 from `norms` = (|original|_1, |kept|_1); 1 when either is ~0."""
    before, after = norms
    return before / after if before >= 1e-8 and after >= 1e-8 else 1.0


def dare_keep(delta: torch.Tensor, mask: torch.Tensor, in_place: bool = False) -> torch.Tensor:
    """`delta` with the entries where the 0/1 (or bool) `mask` is 0 zeroed (in `delta`
    itself if `in_place`)."""
    mask = mask.reshape(delta.shape).to(delta.device, delta.dtype)
    return delta.mul_(mask) if in_place else delta * mask


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A 0/1 (or bool) mask as flat packed bits (numpy.packbits order), 1/32 of its bytes."""
    values = mask.reshape(-1).cpu().numpy()
    return torch.from_numpy(np.packbits(values if values.dtype == np.bool_ else values != 0))


def unpack_bits(
    packed: torch.Tensor, numel: int, value: float = 1.0, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The flat 0/`value` mask (float32, or float64) of the `numel` bits `pack_bits` packed;
    `value` is rounded to `dtype` first, as torch rounds a scalar factor."""
    bits = np.unpackbits(packed.numpy(), count=numel)
    kind = np.float64 if dtype == torch.float64 else np.float32
    if value == 1:
        return torch.from_numpy(bits.astype(kind))
    return torch.from_numpy(np.multiply(bits, kind(value), dtype=kind))


def dare_drop(
    delta: torch.Tensor,
    kept: torch.Tensor,
    density: float,
    rescale: bool,
    mode: str,
    norms: tuple[float, float] | None = None,
) -> torch.Tensor:
    """DARE: `kept` (from `dare_keep`, scaled in place) rescaled by L1 norm or by 1/density."""
    if not rescale:
        return kept
    return rescale_l1(delta, kept, norms) if mode == "l1" else kept.div_(density)


def dare_norms(delta: torch.Tensor, kept: torch.Tensor) -> tuple[float, float]:
    """(|delta|_1, |kept|_1), the same however the tensor is cut into row blocks: sums of
    each row in the work dtype (cascade summation; float32 for 16-bit inputs: this is a
    rescale factor, not an output value), added exactly."""
    work = delta.dtype
    return exact_total([row_sums(delta.abs(), work)]), exact_total([row_sums(kept.abs(), work)])


def row_sums(values: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Sum of each row accumulated in `dtype` (a 0-D or 1-D tensor is one row): a row's sum
    does not depend on which block of rows it was computed in."""
    rows = values.reshape(values.shape[0] if values.dim() > 1 else 1, -1)
    return rows.sum(dim=1, dtype=dtype)


def exact_total(parts: Sequence[torch.Tensor]) -> float:
    """The correctly rounded sum of per-row sums (math.fsum), independent of their grouping."""
    return math.fsum(torch.cat([p.reshape(-1) for p in parts]).tolist()) if parts else 0.0


DRAW_CHUNK = 1 << 16


def bernoulli_keep(
    count: int, offset: int, seed: int, name: str, model: int, probability: float | np.ndarray
) -> np.ndarray:
    """Exact Bernoulli draws, True with probability `probability` (a float, or one per
    entry from offset 0), for the flat entries [offset, offset + count) of tensor `name`.

    Each entry compares a uniform U with p one byte at a time: its first byte b decides
    b < floor(256 p) (keep) or b > floor(256 p) (drop); only on a tie (1 in 256) are more
    bits drawn, 32 at a time, until they differ from p's (`_settle_ties`). So a draw costs
    an eighth of a 64-bit generator word, and P(keep) is p exactly, not p rounded to a grid.
    Every chunk of DRAW_CHUNK entries has its own generator (seed, name, model, chunk) that
    gives the first bytes of the whole chunk, then the tie bits in entry order, so a block
    of rows gets the same draws as the whole tensor has there.
    """
    if count == 0:
        return np.zeros(0, dtype=bool)
    first = offset // DRAW_CHUNK
    chunks = (offset + count - 1) // DRAW_CHUNK - first + 1
    words = torch.empty(chunks * DRAW_CHUNK // 8, dtype=torch.int64)
    generators = [generator_for(seed, f"{name}\0{first + j}", model) for j in range(chunks)]
    for j, generator in enumerate(generators):
        _full_words(words[j * DRAW_CHUNK // 8 : (j + 1) * DRAW_CHUNK // 8], generator)
    keep, ties, rest = _first_bytes(words.numpy().view(np.uint8), probability, count, offset)
    _settle_ties(keep, generators, ties, rest)
    start = offset - first * DRAW_CHUNK
    return keep[start : start + count]


def _full_words(out: torch.Tensor, generator: torch.Generator) -> None:
    """Fill int64 `out` with 64 random bits per entry (the default range has 63)."""
    out.random_(-(2**63), None, generator=generator)


def _first_bytes(
    draws: np.ndarray, probability: float | np.ndarray, count: int, offset: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Compare each entry's first byte with floor(256 p): the keep mask so far, the flat
    places of the ties, and the rest of 256 p there."""
    scaled = np.asarray(probability, dtype=np.float64) * 256
    if scaled.ndim == 0:
        level = math.floor(float(scaled))
        if level >= 256:
            return np.ones(draws.size, dtype=bool), np.zeros(0, dtype=np.int64), np.zeros(0)
        byte, rest = np.uint8(level), float(scaled) - level
        # with no rest a tie is a drop: no need to find the ties
        ties = np.flatnonzero(draws == byte) if rest > 0 else np.zeros(0, dtype=np.int64)
        return draws < byte, ties, np.full(ties.size, rest)
    if offset != 0:
        raise ValueError("per-entry probabilities are drawn for a whole tensor only")
    padded = np.pad(scaled.reshape(-1), (0, draws.size - count))
    levels = np.floor(padded)
    ties = np.flatnonzero(draws == levels)
    return draws < levels, ties, (padded - levels)[ties]


def _settle_ties(
    keep: np.ndarray, generators: Sequence[torch.Generator], ties: np.ndarray, rest: np.ndarray
) -> None:
    """Decide the entries (flat places `ties`) whose first byte equalled p's: keep iff
    U' < `rest` (the rest of 256 p) for a fresh uniform U', read 32 bits per round from
    each entry's chunk generator in entry order. A rest of 0 cannot be beaten: dropped."""
    edges = np.arange(len(generators) + 1) * DRAW_CHUNK
    while True:
        live = rest > 0
        ties, rest = ties[live], rest[live]
        if not ties.size:
            return
        words = torch.empty(ties.size, dtype=torch.int64)
        bounds = np.searchsorted(ties, edges)
        for j, generator in enumerate(generators):
            if bounds[j + 1] > bounds[j]:
                _full_words(words[bounds[j] : bounds[j + 1]], generator)
        bits = words.numpy() & 0xFFFFFFFF
        scaled = rest * 2.0**32
        levels = np.floor(scaled)
        keep[ties[bits < levels]] = True
        tied = bits == levels
        ties, rest = ties[tied], (scaled - levels)[tied]


def breadcrumbs_mask(magnitude: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Drop the `gamma` fraction of largest entries, then the smallest, keeping `density`.

    With floor(gamma n) = 0 nothing is dropped from the top (mergekit zeroes the whole
    tensor there; that is a bug we do not copy).
    """
    upto, top = breadcrumbs_counts(magnitude.numel(), density, gamma)
    return top_k_mask(magnitude, upto) & ~top_k_mask(magnitude, top)


def breadcrumbs_counts(n: int, density: float, gamma: float) -> tuple[int, int]:
    """(entries kept before dropping the top, entries dropped from the top)."""
    target = keep_count(n, density) if density < 1 else n
    n_top = min(math.floor(gamma * n + 1e-9), n - target)
    return target + n_top, n_top


def elect_sign(weighted: torch.Tensor) -> torch.Tensor:
    """Majority sign of the summed (weighted) deltas along dim 0: +1 where the sum is >= 0."""
    return torch.where(weighted.sum(0) >= 0, 1.0, -1.0).to(weighted.dtype)


def disjoint_merge(
    deltas: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool
) -> torch.Tensor:
    """TIES merge of task vectors d_i with weights w_i, without stacking them: the elected
    sign is that of sum_i w_i d_i (+ where >= 0); entries of w_i d_i agreeing with it are
    summed, and divided by the sum of their weights if `normalize`. Entries that are exactly
    zero agree with no sign and count in neither sum."""
    sign = _elected_sign(deltas, weights)
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


def _elected_sign(deltas: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """+1.0 where sum_i w_i d_i >= 0, else -1.0. The sum is made as (+0.0 + w_1 d_1) + ...:
    adding finite values to +0.0 never gives -0.0, so copysign sees no negative zero."""
    zero = torch.zeros((), dtype=deltas[0].dtype, device=deltas[0].device)
    total = torch.add(zero, deltas[0], alpha=weights[0])
    for weight, delta in zip(weights[1:], deltas[1:]):
        total.add_(delta, alpha=weight)
    return torch.copysign(torch.ones((), dtype=total.dtype, device=total.device), total)


def generator_for(seed: int, tensor_name: str, model_index: int = 0) -> torch.Generator:
    """A generator seeded from the run seed, the output tensor's name and the model index."""
    digest = hashlib.sha256(f"{seed}\0{tensor_name}\0{model_index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def magprune_probabilities(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA MagPrune's keep probabilities (float64, one per entry of `delta`): per row,
    (density - eps) + 2 eps * rank / (m - 1), rank 0 for the smallest magnitude, ties by
    index."""
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta.reshape(-1, delta.shape[-1])
    m = rows.shape[-1]
    order = torch.argsort(rows.abs(), dim=-1, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(m, device=rows.device).expand_as(order))
    spread = ranks.double() / (m - 1) if m > 1 else torch.zeros(rows.shape, dtype=torch.float64)
    return ((density - epsilon) + 2 * epsilon * spread).reshape(delta.shape)


def magprune(
    delta: torch.Tensor, probs: torch.Tensor, keep: torch.Tensor, rescale: bool, mode: str
) -> torch.Tensor:
    """DELLA MagPrune: the entries of `delta` drawn to be kept (`keep`, drawn with
    `probs` from `magprune_probabilities`), rescaled by L1 norm or by 1/p per entry."""
    kept = delta * keep.reshape(delta.shape).to(delta.device, delta.dtype)
    if not rescale:
        return kept
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta.reshape(-1, delta.shape[-1])
    if mode == "l1":
        return rescale_l1(rows, kept.reshape(rows.shape)).reshape(delta.shape)
    return kept.div_(probs.to(delta.device, delta.dtype))


def exact_quantile(values: torch.Tensor, q: float) -> float:
    """The q-quantile with linear interpolation (numpy's default), by selection, not sorting."""
    flat = values.reshape(-1)
    position = q * (flat.numel() - 1)
    low = math.floor(position)
    a = float(torch.kthvalue(flat, low + 1).values)
    if position == low:
        return a
    b = float(torch.kthvalue(flat, low + 2).values)
    return a + (position - low) * (b - a)
