"""A LoRA adapter folded into its base tensor on read, in float32 with one cast at the end
(by the caller): `W + scale * B @ A` (transposed for GPT-2's Conv1D and embeddings), DoRA
rescaling each output feature to its trained magnitude, `bias + scale * b` for a LoRA bias,
and the adapter's own tensor for `modules_to_save`. The same float operations, in the same
order, as PEFT's `merge_and_unload`.

A block of rows folds from the base's rows alone, byte-identical to the whole tensor's
rows, except DoRA on a transposed weight (its norms run down columns): that one is folded
whole and its rows taken.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from mergecli.io.checkpoint import Fold, ModelInfo, TensorInfo

Rows = tuple[int, int] | None
FOLD_ROWS = 256
ReadPart = Callable[[ModelInfo | None, TensorInfo, Rows], torch.Tensor]


def fold(
    found: Fold, rows: Rows, read: ReadPart, factor: Callable[[ModelInfo, TensorInfo], torch.Tensor]
) -> torch.Tensor:
    """The tensor `found` describes (only `rows` when given); `read(model, info, rows)`
    reads a stored tensor of `model` (None: the base model), `factor(model, info)` a small
    adapter tensor in float32 (never changed here: it may be shared)."""
    adapter = found.adapter

    def part(name: str) -> torch.Tensor:
        return factor(adapter, adapter.tensors[name])

    if found.replace is not None:
        return read(adapter, adapter.tensors[found.replace], rows)
    span = None if found.magnitude is not None and found.transposed else rows
    base = read(adapter if found.base_in_adapter else None, found.base, span).to(torch.float32)
    if found.a is None:
        assert found.b is not None, "a bias fold names its vector"
        return slice_rows(base + part(found.b) * found.scale, rows, span)
    assert found.b is not None, "a LoRA fold names both matrices"
    a, b = part(found.a), part(found.b)
    left, right = (a.T, b.T) if found.transposed else (b, a)
    merged = plus_delta(base, left, right, found.scale, span)
    if found.magnitude is not None:
        magnitude = part(found.magnitude)
        if span is not None:
            magnitude = magnitude[span[0] : span[1]]
        merged = dora(merged, magnitude, found.transposed)
    return slice_rows(merged, rows, span)


def plus_delta(
    base: torch.Tensor, left: torch.Tensor, right: torch.Tensor, scale: float, rows: Rows
) -> torch.Tensor:
    """`base + scale * (left @ right)[rows]` (`base` holds those rows), into a new tensor.

    Computed by fused `addmm` over chunks of `FOLD_ROWS` rows counted from the tensor's
    first row, each chunk whole (a chunk the block only partly covers gets zero rows
    around it), so a row's value never depends on which block asked for it (a matrix
    product's rounding can depend on its shape): blocks fold byte-identical to the whole
    tensor, and no whole delta is ever held."""
    start, stop = rows or (0, left.shape[0])
    out = torch.empty_like(base)
    for at in range(start - start % FOLD_ROWS, stop, FOLD_ROWS):
        chunk = left[at : at + FOLD_ROWS]
        low, high = max(start, at), min(stop, at + chunk.shape[0])
        if low == at and high == at + chunk.shape[0]:
            torch.addmm(
                base[low - start : high - start],
                chunk,
                right,
                alpha=scale,
                out=out[low - start : high - start],
            )
            continue
        padded = base.new_zeros(chunk.shape[0], base.shape[1])
        padded[low - at : high - at] = base[low - start : high - start]
        out[low - start : high - start] = torch.addmm(padded, chunk, right, alpha=scale)[
            low - at : high - at
        ]
    return out


def dora(merged: torch.Tensor, magnitude: torch.Tensor, transposed: bool) -> torch.Tensor:
    """DoRA's merged weight: each output feature of `W + delta` (a row; a column when
    transposed) scaled to norm `magnitude`."""
    dim = 0 if transposed else 1
    factor: torch.Tensor = magnitude / torch.linalg.norm(merged, dim=dim)
    return merged * (factor.view(1, -1) if transposed else factor.view(-1, 1))


def slice_rows(tensor: torch.Tensor, rows: Rows, read: Rows) -> torch.Tensor:
    """`rows` of a tensor that was computed for `read` (the same rows, or the whole)."""
    if rows is None or read is not None:
        return tensor
    return tensor[rows[0] : rows[1]]
