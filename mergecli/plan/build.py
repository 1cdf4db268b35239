"""The plan: every output tensor with its inputs, method, resolved parameters and shard.

Built from the recipe, configs and safetensors headers only; no weight is read. A pipeline
of small steps over frozen facts: read the inputs, form the output groups, settle tying,
vocabulary and chat template, check whole models, plan every tensor, then config and
shards. Every problem is collected and raised together."""

from __future__ import annotations

from pathlib import Path

from mergecli.errors import Problem, RecipeError
from mergecli.model.tying import find_tying
from mergecli.plan.checks import (
    check_architectures,
    check_modules,
    check_same_tensors,
    check_save_masks,
)
from mergecli.plan.config import output_config
from mergecli.plan.context import Context, Findings
from mergecli.plan.groups import Group, plan_groups, used_models
from mergecli.plan.inputs import Inputs, Resolver, file_resolver, read_inputs
from mergecli.plan.params import prepare_params
from mergecli.plan.post import apply_lines
from mergecli.plan.shards import DEFAULT_SHARD_BYTES, assign_shards
from mergecli.plan.types import MergePlan
from mergecli.plan.walk import plan_all
from mergecli.recipe.refs import recipe_place
from mergecli.recipe.schema import Recipe
from mergecli.vocab.chat_template import resolve_template
from mergecli.vocab.planning import plan_vocabulary
from mergecli.vocab.tokens import VocabPlan


def build_plan(
    recipe: Recipe,
    recipe_dir: Path | None = None,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    seed: int | None = None,
    resolve: Resolver | None = None,
) -> MergePlan:
    """Resolve every model (from files by default, else with `resolve`), read configs and
    headers, and plan each output tensor."""
    inputs = read_inputs(recipe, resolve or file_resolver(recipe_dir, recipe.base_model))
    ctx, template_text, problems = settle(inputs)
    if problems:
        raise RecipeError(problems)
    found = Findings()
    planned, layers = plan_all(ctx, found)
    tensors = apply_lines(recipe, planned)
    problems = found.problems + found.summary(inputs)
    if problems:
        raise RecipeError(problems)
    tensors, shard_names = assign_shards(tensors, shard_bytes)
    config, notes = output_config(ctx, tensors, layers)
    return MergePlan(
        recipe=recipe,
        method=inputs.spec,
        models=inputs.models,
        refs=inputs.refs,
        template=inputs.template,
        tensors=tuple(tensors),
        shard_names=shard_names,
        config=config,
        seed=seed if seed is not None else (recipe.seed if recipe.seed is not None else 0),
        notes=tuple(notes),
        vocab=ctx.vocab,
        chat_template=template_text,
    )


def settle(inputs: Inputs) -> tuple[Context, str | None, list[Problem]]:
    """Everything decided once for the whole merge, before any tensor is planned: groups,
    tying, vocabulary, chat template, per-model prepared values; and the problems found."""
    groups, problems = plan_groups(inputs)
    used = used_models(groups)
    tying = find_tying(inputs.models, used)
    vocab, vocab_problems = _vocabulary(inputs, used)
    problems += vocab_problems + check_save_masks(inputs, vocab)
    template_text = None
    if inputs.recipe.chat_template is not None:
        template_text, problem = resolve_template(
            inputs.recipe.chat_template, inputs.refs, inputs.models, used
        )
        problems += [problem] if problem else []
    problems += check_architectures(inputs, groups) + check_modules(inputs)
    prepared, prepare_problems = prepare_params(inputs, groups)
    problems += prepare_problems
    if inputs.recipe.models and inputs.recipe.tensor_names in (None, "all"):
        problems += check_same_tensors(inputs, groups[0], tying)
    ctx = Context(inputs=inputs, groups=tuple(groups), tying=tying, vocab=vocab, prepared=prepared)
    return ctx, template_text, problems


def _vocabulary(inputs: Inputs, used: list[int]) -> tuple[VocabPlan | None, list[Problem]]:
    where = {i: recipe_place(inputs.recipe, ref) for i, ref in enumerate(inputs.refs)}
    return plan_vocabulary(
        inputs.recipe,
        inputs.refs,
        inputs.models,
        inputs.template,
        used,
        dict(enumerate(inputs.facts)),
        where,
    )


__all__ = ["DEFAULT_SHARD_BYTES", "Group", "build_plan", "settle"]
