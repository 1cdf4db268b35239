"""What every tensor of a plan is planned against, and the findings collected meanwhile."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mergecli.errors import Problem
from mergecli.model.tying import Tying
from mergecli.plan.groups import Group
from mergecli.plan.inputs import Inputs
from mergecli.vocab.tokens import VocabPlan

MAX_TENSOR_PROBLEMS = 3


@dataclass(frozen=True)
class Context:
    """Frozen facts settled before any tensor is planned: the inputs, the output groups,
    how embeddings are tied, the vocabulary plan, per-model values a method read from files."""

    inputs: Inputs
    groups: tuple[Group, ...]
    tying: Tying
    vocab: VocabPlan | None
    prepared: Mapping[int, Mapping[str, Any]]


@dataclass
class Findings:
    """Problems found while planning tensors; past the third tensor problem of a model
    only a count is kept (one summary line per model at the end)."""

    problems: list[Problem] = field(default_factory=list)
    mismatches: dict[int, int] = field(default_factory=dict)

    def add(self, problem: Problem) -> None:
        """Record `problem` unless the same one is recorded already."""
        if problem not in self.problems:
            self.problems.append(problem)

    def mismatch(self, model: int, problem: Problem) -> None:
        """Record a tensor problem of `model` (counted only past MAX_TENSOR_PROBLEMS)."""
        seen = self.mismatches.get(model, 0)
        self.mismatches[model] = seen + 1
        if seen < MAX_TENSOR_PROBLEMS:
            self.problems.append(problem)

    def summary(self, inputs: Inputs) -> list[Problem]:
        """One line per model whose further tensor problems were only counted."""
        return [
            Problem(
                "",
                f"... and {count - MAX_TENSOR_PROBLEMS} more tensors of "
                f"{inputs.models[model].label} are missing or have other shapes",
                "",
                code=4,
            )
            for model, count in self.mismatches.items()
            if count > MAX_TENSOR_PROBLEMS
        ]
