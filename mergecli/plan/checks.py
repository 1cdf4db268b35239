"""Whole-model checks made before any tensor is planned."""

from __future__ import annotations

from mergecli.errors import Problem
from mergecli.model.tying import Tying
from mergecli.plan.groups import Group
from mergecli.plan.inputs import Inputs
from mergecli.vocab.tokens import VocabPlan


def check_architectures(inputs: Inputs, groups: list[Group]) -> list[Problem]:
    """Every input must be the same `model_type` as the base (or first) model."""
    template = inputs.models[inputs.template]
    expected = template.config.get("model_type")
    problems: list[Problem] = []
    seen: set[int] = set()
    for source in (s for g in groups for s in g.sources):
        found = inputs.models[source.model].config.get("model_type")
        if source.model in seen or None in (expected, found) or found == expected:
            continue
        seen.add(source.model)
        problems.append(
            Problem(
                source.where,
                f"{inputs.models[source.model].label} is a `{found}` model but "
                f"{template.label} is `{expected}`",
                "merge models of one architecture (same model_type in config.json)",
                code=4,
            )
        )
    return problems


def check_same_tensors(inputs: Inputs, group: Group, tying: Tying) -> list[Problem]:
    """In the models form every input must hold exactly the template's tensors."""
    template = inputs.models[inputs.template]
    names = set(template.tensors) | set(tying.heads)
    problems = []
    for source in group.sources:
        model = inputs.models[source.model]
        extra = sorted(set(model.tensors) - names)
        if extra:
            problems.append(
                Problem(
                    source.where,
                    f"{model.label} has {len(extra)} tensors that {template.label} lacks "
                    f"(e.g. `{extra[0]}`)",
                    "models must share an architecture and layer count; to combine "
                    "different depths use `slices:`",
                    code=4,
                )
            )
    return problems


def check_save_masks(inputs: Inputs, vocab: VocabPlan | None) -> list[Problem]:
    """Per-task masks are saved per tensor; re-indexed embedding rows have none."""
    params = inputs.recipe.parameters or {}
    if vocab is None or inputs.spec.masks is None or "save_masks" not in params:
        return []
    return [
        Problem(
            "parameters.save_masks",
            "masks cannot be saved when embedding rows are re-indexed",
            "merge models with one vocabulary, or drop save_masks",
        )
    ]
