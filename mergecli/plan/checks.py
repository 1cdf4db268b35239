"""Whole-model checks made before any tensor is planned."""

from __future__ import annotations

from mergecli.errors import Problem
from mergecli.model.modules import module_names, module_of
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
                    "different depths use `slices:`, or merge name for name with "
                    "`tensor_names: intersection` (or `union`)",
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


def check_modules(inputs: Inputs) -> list[Problem]:
    """A `modules:` recipe names modules the template model has, covers every one of them
    (a module left out would be missing from the output), and slices only the module that
    holds the main layer stack."""
    modules = inputs.recipe.modules
    if not modules:
        return []
    template = inputs.models[inputs.template]
    names = list(template.tensors)
    found = module_names(names)
    main = module_of(f"{inputs.stack}.0.x", found) if inputs.stack else None
    problems = [
        Problem(
            f"modules.{name}",
            f"{template.label} has no module `{name}`",
            f"its modules are {', '.join(f'`{m}`' for m in found)}",
        )
        for name in modules
        if name not in found
    ]
    for module in found:
        if module in modules:
            continue
        members = [n for n in names if module_of(n, found) == module]
        problems.append(
            Problem(
                "modules",
                f"module `{module}` of {template.label} ({len(members)} tensors, e.g. "
                f"`{members[0]}`) is in no entry of `modules:`, so the output would lack it",
                f"add `{module}: {{models: [{{model: ...}}]}}` to `modules:`",
            )
        )
    problems += [
        Problem(
            f"modules.{name}.slices",
            f"module `{name}` does not hold the main layer stack (`{inputs.stack}`); only "
            f"`{main}` can be sliced",
            "use `models:` in this module",
        )
        for name, module in modules.items()
        if module.slices and name != main and name in found
    ]
    return problems
