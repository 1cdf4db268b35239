"""Frozen facts about the inputs: each model resolved, its config, headers and tokenizer."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from mergecli.errors import MergecliError, Problem
from mergecli.io.checkpoint import ModelInfo, load_model_info
from mergecli.io.source import resolve_source
from mergecli.model.layers import main_stack
from mergecli.recipe.schema import ModelRef, Recipe
from mergecli.vocab.planning import TokenizerFacts
from mergecli.vocab.tokens import parse_tokenizer

LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


TOKENIZER_DEFINING = ("tokenizer.model", "spiece.model", "vocab.json", "merges.txt", "vocab.txt")


def recipe_place(recipe: Recipe, ref: ModelRef) -> str:
    if recipe.base_model == ref:
        return "base_model"
    for i, m in enumerate(recipe.models or []):
        if m.model == ref:
            return f"models[{i}].model"
    for i, s in enumerate(recipe.slices or []):
        for j, src in enumerate(s.sources):
            if src.model == ref:
                return f"slices[{i}].sources[{j}].model"
    return "tokenizer_source"


def tokenizer_facts(model: ModelInfo) -> TokenizerFacts:
    """The vocabulary in `tokenizer.json`, or a digest of the other tokenizer files."""
    files = set(model.source.files())
    vocab = None
    if "tokenizer.json" in files:
        document = json.loads(model.source.local("tokenizer.json").read_text(encoding="utf-8"))
        try:
            vocab = parse_tokenizer(document)
        except ValueError:
            vocab = None
    defining = sorted(f for f in files if f in TOKENIZER_DEFINING or f.endswith(".tiktoken"))
    digest = hashlib.sha256()
    for name in defining:
        digest.update(name.encode() + b"\0" + model.source.local(name).read_bytes())
    listed = (["tokenizer.json"] if "tokenizer.json" in files else []) + defining
    return TokenizerFacts(vocab, digest.hexdigest() if defining else None, tuple(listed))


def load_models(
    recipe: Recipe, refs: list[ModelRef], recipe_dir: Path | None
) -> tuple[list[ModelInfo], list[Problem]]:
    models: list[ModelInfo] = []
    problems: list[Problem] = []
    for ref in refs:
        try:
            models.append(load_model_info(resolve_source(ref, recipe_dir)))
        except MergecliError as exc:
            problems.append(
                Problem(recipe_place(recipe, ref), exc.message, exc.hint, code=exc.exit_code)
            )
    return models, problems


def layer_section(config: dict[str, Any], stack: str) -> dict[str, Any]:
    text = config.get("text_config")
    vision = any(word in stack for word in ("vision", "visual"))
    return text if isinstance(text, dict) and not vision else config


def main_stack_of(model: ModelInfo) -> str | None:
    section = layer_section(model.config, "")
    depth = next((section[k] for k in LAYER_COUNT_KEYS if isinstance(section.get(k), int)), None)
    return main_stack(list(model.tensors), depth)
