"""The plan's types: every output tensor with its inputs, method, resolved parameters and shard."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from mergecli.io.checkpoint import ModelInfo, stored_parts
from mergecli.io.dtypes import ITEMSIZE
from mergecli.methods.spec import MethodSpec
from mergecli.recipe.schema import ModelRef, Recipe
from mergecli.vocab.tokens import VocabPlan

Section = Literal["pre", "layer", "post"]


@dataclass(frozen=True)
class InputRef:
    """One input tensor: model index into `MergePlan.models` and tensor name."""

    model: int
    name: str


@dataclass(frozen=True)
class TensorPlan:
    """What to compute for one output tensor."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    section: Section
    layer: int | None
    t: float
    inputs: tuple[InputRef, ...]
    base: InputRef | None
    params: Mapping[str, Any]
    per_model: tuple[Mapping[str, Any], ...]
    copy: bool
    shard: int = 0
    post_scale: float | None = None
    vocab_names: Mapping[int, str] | None = field(default=None, compare=False)

    @property
    def nbytes(self) -> int:
        """Bytes this tensor takes in the output."""
        return math.prod(self.shape) * ITEMSIZE[self.dtype]

    @property
    def numel(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)

    @property
    def row_numel(self) -> int:
        """Elements per row (along the first dimension); all of them for 0-D/empty tensors."""
        return self.numel // self.shape[0] if self.shape and self.shape[0] else self.numel


@dataclass(frozen=True)
class MergePlan:
    """The whole merge, ready to execute."""

    recipe: Recipe
    method: MethodSpec
    models: tuple[ModelInfo, ...]
    refs: tuple[ModelRef, ...]
    template: int
    tensors: tuple[TensorPlan, ...]
    shard_names: tuple[str, ...]
    config: dict[str, Any]
    seed: int
    notes: tuple[str, ...] = field(default=())
    vocab: VocabPlan | None = None
    chat_template: str | None = None

    @property
    def total_bytes(self) -> int:
        """Bytes of tensor data written."""
        return sum(t.nbytes for t in self.tensors)

    @property
    def read_bytes(self) -> int:
        """Bytes of distinct stored tensor data read (a base under several adapters once)."""
        seen = dict(
            part
            for t in self.tensors
            for ref in (*t.inputs, *([t.base] if t.base else []))
            for part in stored_parts(
                self.models[ref.model], self.models[ref.model].tensors[ref.name]
            )
        )
        return sum(seen.values())
