"""A task vector factored into a rank-k LoRA pair: `delta ~= B @ A` with the least
Frobenius error of any rank-k matrix (Eckart-Young: the top k singular directions).

Exact: the eigen-decomposition (float64) of the smaller Gram matrix (`DᵀD` or `DDᵀ`, built
in row chunks, each chunk's product in float32 and their sum in float64), which also gives
the whole spectrum for `--energy`; the kept energy and the error are then measured on
`D V` in float64, so they are the factors' own. Randomized (`torch.svd_lowrank` with oversampling and power
iterations) for large matrices at a fixed rank, where it is as accurate (checked against the
exact error in tests/lora and benchmarks). Both split the singular values evenly between
the factors: `B = U sqrt(S)`, `A = sqrt(S) Vᵀ`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

CHUNK_ROWS = 4096
OVERSAMPLE = 32
POWER_ITERATIONS = 6
EXACT_SIDE = 2048  # `auto` factors matrices whose smaller side is at most this exactly
Solver = Literal["auto", "exact", "randomized"]


@dataclass(frozen=True)
class RowMatrix:
    """A tall matrix read in row chunks (`read(start, stop)`, float32), for deltas too big
    to hold (embeddings, LM heads); factored exactly."""

    shape: tuple[int, int]
    read: Callable[[int, int], torch.Tensor]

    def __getitem__(self, rows: slice) -> torch.Tensor:
        start, stop, _ = rows.indices(self.shape[0])
        return self.read(start, stop)


Matrix = torch.Tensor | RowMatrix


@dataclass(frozen=True)
class Factors:
    """`b @ a` approximates the delta; `error` is `||D - B A||_F / ||D||_F`."""

    b: torch.Tensor
    a: torch.Tensor
    error: float

    @property
    def rank(self) -> int:
        """The rank of the pair."""
        return int(self.a.shape[0])


def squared_norm(delta: Matrix) -> float:
    """`||delta||_F^2`, accumulated in float64 chunk by chunk."""
    total = 0.0
    for start in range(0, delta.shape[0], CHUNK_ROWS):
        total += float(delta[start : start + CHUNK_ROWS].double().square().sum())
    return total


def gram(delta: Matrix) -> torch.Tensor:
    """`DᵀD` of a tall `delta`: each chunk of rows in float32, summed in float64. Only the
    basis comes from it; errors and singular values are measured on `D V` in float64."""
    out = torch.zeros(delta.shape[1], delta.shape[1], dtype=torch.float64)
    for start in range(0, delta.shape[0], CHUNK_ROWS):
        chunk = delta[start : start + CHUNK_ROWS].float()
        out += (chunk.T @ chunk).double()
    return out


def energy_rank(values: torch.Tensor, total: float, energy: float) -> int:
    """The smallest k whose top-k squared singular values (`values`, descending) keep
    `energy` of `total`."""
    kept = torch.cumsum(values, 0)
    return min(int((kept < energy * total).sum()) + 1, values.numel())


def factor(
    delta: Matrix,
    rank: int | None = None,
    energy: float | None = None,
    solver: Solver = "auto",
) -> Factors:
    """The best rank-`rank` pair of `delta` (2-D, float32; a tall `RowMatrix` is read in
    chunks and factored exactly), or the smallest pair keeping `energy` of its squared
    singular values; an all-zero delta gives rank 0."""
    tall = delta.shape[0] >= delta.shape[1]
    if isinstance(delta, RowMatrix):
        assert tall, "a RowMatrix is tall"
        solver = "exact"
    matrix: Matrix = delta if isinstance(delta, RowMatrix) or tall else delta.T
    total = squared_norm(matrix)
    if total == 0.0:
        return _empty(tuple(delta.shape))
    side = matrix.shape[1]
    randomized = solver == "randomized" or (
        solver == "auto"
        and energy is None
        and side > EXACT_SIDE
        and rank is not None
        and rank * 8 < side
    )
    if randomized:
        assert rank is not None and isinstance(matrix, torch.Tensor), (
            "randomized: a rank, in memory"
        )
        basis, values = _randomized(matrix, min(rank, side))
    else:
        basis, values = _exact(matrix, total, rank, energy)
    keep = int((values > total * 1e-14).sum())
    basis = basis[:, :keep]
    projected = _times(matrix, basis)  # [rows, k] = D V, float64
    values = projected.square().sum(0)  # sigma^2, measured
    root = values.sqrt().sqrt()  # sqrt(sigma)
    left, right = projected / root, (basis * root).T  # D ≈ left @ right = D V Vᵀ
    error = math.sqrt(max(total - float(values.sum()), 0.0) / total)
    if tall:
        return Factors(left.float(), right.float(), error)
    return Factors(right.T.float(), left.T.float(), error)


def _exact(
    matrix: Matrix, total: float, rank: int | None, energy: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    values, vectors = torch.linalg.eigh(gram(matrix))
    values, vectors = values.flip(0).clamp(min=0), vectors.flip(1)
    k = energy_rank(values, total, energy) if energy is not None else min(rank or 1, values.numel())
    return vectors[:, :k], values[:k]


def _randomized(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    q = min(rank + OVERSAMPLE, matrix.shape[1])
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(0)  # a reproducible sketch
    try:
        _, sigma, v = torch.svd_lowrank(matrix.double(), q=q, niter=POWER_ITERATIONS)
    finally:
        torch.random.set_rng_state(generator_state)
    return v[:, :rank], sigma[:rank].square()


def _times(matrix: Matrix, basis: torch.Tensor) -> torch.Tensor:
    """`matrix @ basis` in float64, chunk by chunk."""
    pieces = [
        matrix[start : start + CHUNK_ROWS].double() @ basis
        for start in range(0, matrix.shape[0], CHUNK_ROWS)
    ]
    return torch.cat(pieces)


def _empty(shape: tuple[int, ...]) -> Factors:
    return Factors(torch.zeros(shape[0], 0), torch.zeros(0, shape[1]), 0.0)
