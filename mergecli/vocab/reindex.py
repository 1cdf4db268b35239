"""Merge per-token tensors (embeddings, heads) row by row over the models that have each token.

Each model's rows are first placed at the output vocabulary's ids (`VocabPlan.maps`). A row
is merged by the recipe's method over the models that hold it (per-model parameters of the
others are dropped, so weights renormalise where the method normalises). When the method
cannot run on that subset (no base row for a method that needs one, fewer models than it
takes), the row is the weight-normalised mean of the rows present; a row no model has is
zero. Rows are grouped by which models hold them, so each group is one method call.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import torch

from mergecli.methods.facts import apply
from mergecli.methods.spec import MergeArgs, MethodSpec
from mergecli.vocab.tokens import VocabPlan


class _Ref(Protocol):
    @property
    def model(self) -> int: ...


class RowTensor(Protocol):
    """What row re-indexing needs of a planned per-token tensor (`plan.types.TensorPlan`)."""

    @property
    def name(self) -> str: ...
    @property
    def inputs(self) -> Sequence[_Ref]: ...
    @property
    def base(self) -> _Ref | None: ...
    @property
    def params(self) -> Mapping[str, Any]: ...
    @property
    def per_model(self) -> Sequence[Mapping[str, Any]]: ...
    @property
    def post_scale(self) -> float | None: ...


def _placed(
    vocab: VocabPlan, model: int, tensor: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    index = torch.from_numpy(vocab.maps[model])
    present = index >= 0
    out = tensor.new_zeros((vocab.rows, *tensor.shape[1:]))
    out[present] = tensor[index[present]]
    return out, present


def _source_row(
    vocab: VocabPlan, row: int, loaded: Mapping[int, torch.Tensor], like: torch.Tensor
) -> torch.Tensor:
    model, source = vocab.overrides[row]
    return like.new_zeros(like.shape[1:]) if model is None else loaded[model][source]


def _runnable(spec: MethodSpec, count: int, has_base: bool) -> bool:
    if count < spec.min_models or (spec.max_models is not None and count > spec.max_models):
        return False
    return has_base or not spec.needs_base


def _mean(rows: list[torch.Tensor], per_model: list[Mapping[str, Any]]) -> torch.Tensor:
    weights = [1.0 if p.get("weight") is None else float(p["weight"]) for p in per_model]
    if sum(weights) == 0.0:
        weights = [1.0] * len(rows)
    total = sum(weights)
    return sum((w / total) * r for w, r in zip(weights, rows))  # type: ignore[return-value]


def merge_rows(
    vocab: VocabPlan,
    tensor: RowTensor,
    loaded: Mapping[int, torch.Tensor],
    spec: MethodSpec,
    seed: int,
) -> torch.Tensor:
    """The merged per-token tensor with `vocab.rows` rows (`loaded`: model -> its tensor)."""
    refs = [*tensor.inputs, *([tensor.base] if tensor.base else [])]
    placed = [_placed(vocab, r.model, loaded[r.model]) for r in refs]
    like = loaded[refs[0].model]
    if vocab.fill is not None:
        fill, has = _placed(vocab, vocab.fill, loaded[vocab.fill])
        for values, present in placed:
            take = has & ~present
            values[take] = fill[take]
            present |= has
    for row in (r for r in vocab.overrides if r not in vocab.forced):
        for values, present in placed:
            if not present[row]:
                values[row] = _source_row(vocab, row, loaded, like)
                present[row] = True
    if vocab.padding is not None:
        forced = {row: _source_row(vocab, row, loaded, like) for row in vocab.forced}
        _pad(placed, forced, *vocab.padding)
    codes = torch.zeros(vocab.rows, dtype=torch.int64)
    for bit, (_, present) in enumerate(placed):
        codes |= present.to(torch.int64) << bit
    out = like.new_zeros((vocab.rows, *like.shape[1:]))
    for code in (int(c) for c in torch.unique(codes)):
        rows = (codes == code).nonzero().squeeze(1)
        out[rows] = _merge_group(code, rows, placed, tensor, spec, seed)
    for row in vocab.forced:
        out[row] = _source_row(vocab, row, loaded, like)
    return out


def _pad(
    placed: list[tuple[torch.Tensor, torch.Tensor]],
    forced: Mapping[int, torch.Tensor],
    start: int,
    size: int,
) -> None:
    """Rows from `start` on take, in each model, the mean of its `size` token rows as
    mergekit places them: a forced row as forced, a row the model lacks as the plain mean of
    the models that have it."""
    sums = torch.stack([values for values, _ in placed]).sum(dim=0)
    count = torch.stack([present for _, present in placed]).sum(dim=0).to(sums.dtype)
    shape = (-1, *[1] * (sums.dim() - 1))
    stand_in = sums / count.clamp(min=1).view(shape)
    for values, present in placed:
        filled = torch.where(present.view(shape), values, stand_in)
        for row, value in forced.items():
            filled[row] = value
        values[start:] = filled[:size].mean(dim=0)
        present[start:] = True


def _merge_group(
    code: int,
    rows: torch.Tensor,
    placed: list[tuple[torch.Tensor, torch.Tensor]],
    tensor: RowTensor,
    spec: MethodSpec,
    seed: int,
) -> torch.Tensor:
    count = len(tensor.inputs)
    members = [i for i in range(count) if code >> i & 1]
    base = placed[count][0][rows] if tensor.base and code >> count & 1 else None
    values = [placed[i][0][rows] for i in members]
    per_model = [tensor.per_model[i] for i in members]
    if not members:
        return base if base is not None else placed[0][0][rows].zero_()
    if not _runnable(spec, len(members), base is not None):
        return _mean(values, per_model)
    args = MergeArgs(values, base, tensor.params, per_model, tensor.name, seed)
    result = apply(spec, args)
    if tensor.post_scale is not None and base is not None:
        result = base + tensor.post_scale * (result - base)
    return result
