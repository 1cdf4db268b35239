"""Method specifications: what a method takes, used by validation, `methods` and the card."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from mergecli.methods.kernels.selection import Selection

ParamType = Literal["float", "int", "bool", "str"]
Scope = Literal["model", "global"]


@dataclass(frozen=True)
class ParamSpec:
    """One parameter: `scope="model"` is set per input model (weight, density)."""

    name: str
    type: ParamType
    scope: Scope
    description: str
    default: Any = None
    required: bool = False
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    choices: tuple[str, ...] = ()

    def allowed(self) -> str:
        """What values are allowed, in words."""
        if self.choices:
            return "one of " + ", ".join(self.choices)
        if self.type == "bool":
            return "true or false"
        low = "" if self.minimum is None else f"{self.minimum}"
        high = "" if self.maximum is None else f"{self.maximum}"
        kind = "an integer" if self.type == "int" else "a number"
        if low and high:
            left = "(" if self.exclusive_minimum else "["
            return f"{kind} in {left}{low}, {high}]"
        if low:
            return f"{kind} {'>' if self.exclusive_minimum else '>='} {low}"
        if high:
            return f"{kind} <= {high}"
        return kind

    def check(self, value: Any) -> str | None:
        """None when `value` is allowed, else what is wrong."""
        if self.type == "bool":
            # 0 and 1 (also 0.0, 1.0) are booleans to mergekit's schema: `normalize: 1.0`
            numeric = not isinstance(value, bool) and isinstance(value, (int, float))
            if isinstance(value, bool) or (numeric and value in (0, 1)):
                return None
            return f"expected true or false, found {value!r}"
        if self.type == "str":
            if not isinstance(value, str) or (self.choices and value not in self.choices):
                return f"expected {self.allowed()}, found {value!r}"
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"expected {self.allowed()}, found {value!r}"
        if not math.isfinite(value):
            return f"{value!r} is not a finite number; allowed: {self.allowed()}"
        if self.type == "int" and not isinstance(value, int):
            return f"expected {self.allowed()}, found {value!r}"
        too_low = self.minimum is not None and (
            value <= self.minimum if self.exclusive_minimum else value < self.minimum
        )
        too_high = self.maximum is not None and value > self.maximum
        return (
            f"{value!r} is out of range; allowed: {self.allowed()}" if too_low or too_high else None
        )


@dataclass(frozen=True)
class TensorFacts:
    """Whole-tensor facts a method asks for, computed over the whole tensor whatever part
    of it a call holds: per model, its top-k selections (one per count of
    `MethodSpec.topk`); per score of the method's own (`MethodSpec.score`), its
    selections (one per count of `score_topk`); per model, its sums over the tensor
    (`MethodSpec.sums`, made with the selections known); what each earlier statistics
    pass found (`MethodSpec.priors`, in order); per model,
    the packed keep bits drawn with those sums (DARE's drop, drawn once); `offset`, the
    flat index of the first entry held (random draws depend on the position); per model,
    its sums over dim 0 (`BlockSums.grouped`: a column's norm, say), float64 tensors; and
    what the method derives from all that once per tensor (`MethodSpec.derive`)."""

    selections: Sequence[Sequence[Selection]] = ()
    ranked: Sequence[Sequence[Selection]] = ()
    sums: Sequence[Sequence[float]] = ()
    kept: Sequence[torch.Tensor | None] = ()
    offset: int = 0
    grouped: Sequence[Sequence[torch.Tensor]] = ()
    priors: Sequence[Totals] = ()
    derived: Any = None


@dataclass(frozen=True)
class Totals:
    """What one of a method's earlier statistics passes (`MethodSpec.priors`) found over
    the whole tensor: per model, each quantity's sum and each quantity's maximum."""

    sums: Sequence[Sequence[float]] = ()
    peaks: Sequence[Sequence[float]] = ()


@dataclass(frozen=True)
class MergeArgs:
    """Everything a method function sees for one output tensor (all tensors float32/64).

    `tensors` are the non-base inputs in recipe order; `per_model` holds their resolved
    model-scope parameters, `params` the method-wide ones; `name` is the output tensor name
    and `seed` the run's seed (random methods derive their generator from both). `facts`
    are the whole-tensor facts the method's spec asks for (`methods.apply` computes them
    when the tensors are whole; the engine computes them over row blocks); `whole_shape`
    the whole tensor's shape when the tensors are a block of its rows.
    """

    tensors: Sequence[torch.Tensor]
    base: torch.Tensor | None
    params: Mapping[str, Any]
    per_model: Sequence[Mapping[str, Any]]
    name: str = ""
    seed: int = 0
    facts: TensorFacts | None = None
    whole_shape: tuple[int, ...] | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the whole output tensor (the tensors held may be a block of rows)."""
        held = self.base if self.base is not None else self.tensors[0]
        return self.whole_shape if self.whole_shape is not None else tuple(held.shape)

    @property
    def whole(self) -> TensorFacts:
        """The whole-tensor facts (given by `methods.apply` or the engine)."""
        assert self.facts is not None, "call methods.apply, which computes the facts"
        return self.facts

    @property
    def offset(self) -> int:
        """Flat index of the first entry held (0 for a whole tensor)."""
        return self.facts.offset if self.facts is not None else 0


@dataclass(frozen=True)
class BlockSums:
    """What a method's statistics pass takes from one block: per model, per-row partial
    sums of each quantity it needs over the whole tensor; per model, the packed keep bits
    the merge of the same block reuses (or nothing); per model, quantities summed over
    dim 0 as `kernels.sums.group_sums` gives them (a partial per `MethodSpec.row_group`
    rows), added group by group in order; per model, per-row maxima of quantities whose
    maximum over the tensor is wanted (`Totals.peaks`)."""

    sums: list[list[torch.Tensor]]
    kept: list[torch.Tensor | None] = field(default_factory=list)
    grouped: list[list[torch.Tensor]] = field(default_factory=list)
    peaks: list[list[torch.Tensor]] = field(default_factory=list)


MethodFn = Callable[[MergeArgs], torch.Tensor]
ParamCheck = Callable[[Mapping[str, Any], Mapping[str, Any]], str | None]
TopK = Callable[[Mapping[str, Any], Mapping[str, Any], int], list[int]]
ScoreTopK = Callable[[Mapping[str, Any], int], list[int]]
Prepare = Callable[[Sequence[Mapping[str, Any] | None], Mapping[str, Any]], list[dict[str, Any]]]


@dataclass(frozen=True)
class MethodSpec:
    """A registered merge method."""

    name: str
    fn: MethodFn
    summary: str
    params: tuple[ParamSpec, ...] = ()
    needs_base: bool = False
    optional_base: bool = False
    min_models: int = 1
    max_models: int | None = None
    random: bool = False
    data: Literal["data-free", "calibration", "checkpoint metrics"] = "data-free"
    paper: str = ""
    aliases: tuple[str, ...] = field(default=())
    check: ParamCheck | None = None
    reads: str | None = None
    prepare: Prepare | None = None
    masks: Callable[[MergeArgs], list[torch.Tensor]] | None = None
    elementwise: bool = False
    copies: Callable[[Mapping[str, Any], Sequence[Mapping[str, Any]]], bool] | None = None
    # with these (method-wide, per-model) parameters the output is the single input
    # unchanged: a plain copy, no math
    count_hint: str = ""  # what to do instead when a recipe gives the wrong model count
    topk: TopK | None = None
    score: Callable[[MergeArgs], list[torch.Tensor]] | None = None  # non-negative scores
    # of every entry (one tensor per score), from a block's inputs
    score_topk: ScoreTopK | None = None  # (method-wide parameters, entries) -> the k of
    # each exact top-k selection of every score over the whole tensor (`TensorFacts.ranked`)
    derive: Callable[[Mapping[str, Any], tuple[int, ...], TensorFacts], Any] | None = None
    # (method-wide parameters, whole shape, facts) -> what every block of a tensor needs,
    # computed once from its facts (`TensorFacts.derived`)
    priors: tuple[Callable[[MergeArgs], BlockSums], ...] = ()  # statistics passes before
    # the scores are ranked, in order; each sees the earlier ones' `Totals`
    sums: Callable[[MergeArgs], BlockSums] | None = None  # model i's sums run over every
    # entry of its tensor and of the base: finite sums vouch that those inputs are finite
    kept_bits: bool = False  # `sums` keeps a bit per entry and input for the merge pass
    sums_vouch: bool = True  # a NaN/Inf input makes `sums` non-finite (counts do not)
    whole_when: Callable[[Mapping[str, Any], tuple[int, ...]], bool] | None = None  # with
    # these method-wide parameters, for a tensor of this shape, it takes the whole tensor
    row_group: int = 0  # rows per partial of `BlockSums.grouped`; blocks start at multiples
    chunk_aligned: bool = False  # row blocks start at a multiple of the draw chunk
    # (`kernels.bernoulli.DRAW_CHUNK`): draws with one probability per entry need it
    peak_copies: float = 5.0  # float32 copies per input at peak, heap slack included;
    # fitted per method on the 0.5b workload with 1M-entry blocks (benchmarks/RESULTS.md:
    # linear and task arithmetic 5, TIES 8, DARE 11.5, slerp 15) and checked on the 1.5b one

    @property
    def blockwise(self) -> bool:
        """True when a big tensor can be merged in row blocks (element-wise after top-k)."""
        return (
            self.elementwise
            or self.topk is not None
            or self.score is not None
            or self.sums is not None
            or bool(self.priors)
        )

    @property
    def needs_facts(self) -> bool:
        """True when the method reads whole-tensor facts (`TensorFacts`) of any kind."""
        return bool(self.topk or self.score or self.sums or self.priors or self.derive)

    @property
    def uses_base(self) -> bool:
        """True when a given base model is taken apart from the other inputs."""
        return self.needs_base or self.optional_base

    def param(self, name: str) -> ParamSpec | None:
        """The parameter called `name`, if the method takes it."""
        return next((p for p in self.params if p.name == name), None)

    def scoped(self, scope: Scope) -> tuple[ParamSpec, ...]:
        """The parameters of one scope."""
        return tuple(p for p in self.params if p.scope == scope)

    def with_defaults(
        self, params: Mapping[str, Any], per_model: Sequence[Mapping[str, Any]]
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Method-wide and per-model values with the defaults filled in, as a recipe's top
        level would give them: a per-model parameter in `params` applies to every model
        that does not set its own."""
        scoped = {p.name for p in self.scoped("model")}
        shared = {k: v for k, v in params.items() if k in scoped}
        full = {p.name: p.default for p in self.scoped("global")}
        full |= {k: v for k, v in params.items() if k not in scoped}
        defaults = {p.name: p.default for p in self.scoped("model")}
        return full, [defaults | shared | dict(m) for m in per_model]
