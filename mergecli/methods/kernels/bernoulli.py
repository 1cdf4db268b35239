"""Exact Bernoulli(p) draws from seeded generators (equal to `reference.bernoulli_keep`:
keep iff U < p, compared exactly), and packed keep bits."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import numpy as np
import torch


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


DRAW_CHUNK = 1 << 16


def bernoulli_keep(
    count: int, offset: int, seed: int, name: str, model: int, probability: float | np.ndarray
) -> np.ndarray:
    """Exact Bernoulli draws, True with probability `probability` (a float, or one per
    entry, then `offset` a multiple of DRAW_CHUNK), for the flat entries
    [offset, offset + count) of tensor `name`.

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
    if offset % DRAW_CHUNK:
        raise ValueError("per-entry probabilities are drawn from a chunk's first entry only")
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


def generator_for(seed: int, tensor_name: str, model_index: int = 0) -> torch.Generator:
    """A generator seeded from the run seed, the output tensor's name and the model index."""
    digest = hashlib.sha256(f"{seed}\0{tensor_name}\0{model_index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
