"""Frozen facts about the inputs: each model resolved, its config, headers and tokenizer."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergecli import methods
from mergecli.errors import IncompatibleModelError, MergecliError, Problem, RecipeError
from mergecli.io.checkpoint import ModelInfo
from mergecli.io.dequant import dequantized_view
from mergecli.io.jsonfile import read_json
from mergecli.methods.spec import MethodSpec
from mergecli.model.layers import layer_counts, layer_rests, main_stack
from mergecli.plan.adapters import model_resolver
from mergecli.recipe.parts import first_model, parts
from mergecli.recipe.refs import raw_model_places, recipe_place, referenced_models
from mergecli.recipe.schema import ModelRef, Recipe
from mergecli.vocab.planning import TokenizerFacts
from mergecli.vocab.tokens import parse_tokenizer

LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
TOKENIZER_DEFINING = ("tokenizer.model", "spiece.model", "vocab.json", "merges.txt", "vocab.txt")


@dataclass(frozen=True)
class Inputs:
    """What the planner knows before planning any tensor: the recipe, its method, every
    referenced model (configs, headers, tokenizers) and the template model's layer stack."""

    recipe: Recipe
    spec: MethodSpec
    refs: tuple[ModelRef, ...]
    models: tuple[ModelInfo, ...]
    facts: tuple[TokenizerFacts, ...]
    template: int
    main_stacks: tuple[str | None, ...]
    layers: tuple[Mapping[int, tuple[str, ...]], ...] = ()  # per model: its main stack's
    # layer index -> the names within that layer

    @property
    def stack(self) -> str | None:
        """The template model's main layer stack (`model.layers`, ...)."""
        return self.main_stacks[self.template]

    @property
    def depth(self) -> int:
        """Layers in the template model's main stack."""
        return depth_of(self.models[self.template], self.stack)

    def index(self, ref: ModelRef) -> int:
        """Position of `ref` in `models`."""
        return self.refs.index(ref)


Resolver = Callable[[ModelRef], ModelInfo]


def file_resolver(recipe_dir: Path | None, base: ModelRef | None = None) -> Resolver:
    """Models from local folders or the Hub (relative paths: working directory, then
    `recipe_dir`), LoRA adapters folded into their base (`base`: the recipe's base_model,
    which an adapter named alone is folded into): configs, indexes and headers only."""
    return model_resolver(recipe_dir, base)


def read_inputs(recipe: Recipe, resolve: Resolver) -> Inputs:
    """Resolve and read every model of a checked recipe (configs and headers only)."""
    spec = methods.get(recipe.merge_method)
    assert spec is not None, "recipe was checked against the registry"
    refs = tuple(referenced_models(recipe))
    loaded, problems = load_models(recipe, refs, resolve)
    if problems:
        raise RecipeError(problems)
    models = tuple(model for model, _ in loaded)
    stacks = tuple(main_stack_of(m) for m in models)
    layers = tuple(layer_rests(list(m.tensors), s) for m, s in zip(models, stacks))
    gaps = [_gap(recipe, *found) for found in zip(refs, models, stacks, layers)]
    if any(gaps):
        raise RecipeError([g for g in gaps if g is not None])
    return Inputs(
        recipe=recipe,
        spec=spec,
        refs=refs,
        models=models,
        facts=tuple(facts for _, facts in loaded),
        template=refs.index(template_ref(recipe)),
        main_stacks=stacks,
        layers=layers,
    )


def _gap(
    recipe: Recipe,
    ref: ModelRef,
    model: ModelInfo,
    stack: str | None,
    layers: Mapping[int, tuple[str, ...]],
) -> Problem | None:
    """A main stack must number its layers 0..N-1 (a gap or an absurd index is a damaged
    checkpoint, and would make every later step walk layers that do not exist)."""
    if not layers or len(layers) == max(layers) + 1:
        return None
    missing = next(i for i in range(len(layers) + 1) if i not in layers)
    return Problem(
        recipe_place(recipe, ref),
        f"{model.label}: the layers of `{stack}` are numbered up to {max(layers)} but only "
        f"{len(layers)} exist (no layer {missing})",
        "layer numbers must run 0..N-1; is the checkpoint damaged?",
        code=3,
    )


def template_ref(recipe: Recipe) -> ModelRef:
    """The model whose layout and config the output takes: the base, else the first."""
    if recipe.base_model is not None:
        return recipe.base_model
    return first_model(parts(recipe)[0])


def tokenizer_facts(model: ModelInfo) -> TokenizerFacts:
    """The vocabulary in `tokenizer.json`, or a digest of the other tokenizer files."""
    files = set(model.source.files())
    vocab = None
    if "tokenizer.json" in files:
        document = read_json(model.source.local("tokenizer.json"), model.label)
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
    recipe: Recipe, refs: tuple[ModelRef, ...], resolve: Resolver
) -> tuple[list[tuple[ModelInfo, TokenizerFacts]], list[Problem]]:
    """Every model's info and tokenizer facts, and a problem (at its place in the recipe)
    for each model that fails to load (a damaged tokenizer file included)."""
    models: list[tuple[ModelInfo, TokenizerFacts]] = []
    problems: list[Problem] = []
    for ref in refs:
        try:
            models.append(read_model(resolve, ref))
        except MergecliError as exc:
            problems.append(
                Problem(recipe_place(recipe, ref), exc.message, exc.hint, code=exc.exit_code)
            )
    return models, problems


QUANTIZED_TENSORS = (".qweight", ".qzeros", ".g_idx", ".SCB", ".weight_format", ".absmax")


def refuse_quantized(model: ModelInfo) -> None:
    """A quantized checkpoint holds packed integers and scales: merged as numbers they would
    give garbage, so it is refused (exit 4) until it is dequantized."""
    configs = [model.config, model.config.get("text_config") or {}]
    found = next(
        (
            c["quantization_config"]
            for c in configs
            if isinstance(c, dict) and c.get("quantization_config")
        ),
        None,
    )
    packed = next((n for n in model.tensors if n.endswith(QUANTIZED_TENSORS)), None)
    if found is None and packed is None:
        return
    method = found.get("quant_method", "unknown") if isinstance(found, dict) else "unknown"
    what = f"quant_method `{method}` in config.json" if found is not None else f"`{packed}`"
    raise IncompatibleModelError(
        f"{model.label} is a quantized checkpoint ({what}); its packed weights and scales "
        "cannot be merged as numbers",
        hint="merge the unquantized original, or dequantize first (transformers: load it, "
        "`model.dequantize()`, `save_pretrained`)",
    )


def read_model(resolve: Resolver, ref: ModelRef) -> tuple[ModelInfo, TokenizerFacts]:
    """One model's info and tokenizer facts, refused when quantized or damaged."""
    model = dequantized_view(resolve(ref))
    refuse_quantized(model)
    return model, tokenizer_facts(model)


def layer_section(config: dict[str, Any], stack: str) -> dict[str, Any]:
    """The config section describing `stack`: `text_config` of a multimodal model."""
    text = config.get("text_config")
    vision = any(word in stack for word in ("vision", "visual"))
    return text if isinstance(text, dict) and not vision else config


def main_stack_of(model: ModelInfo) -> str | None:
    """The model's main (text) layer stack."""
    section = layer_section(model.config, "")
    depth = next((section[k] for k in LAYER_COUNT_KEYS if isinstance(section.get(k), int)), None)
    return main_stack(list(model.tensors), depth)


def depth_of(model: ModelInfo, stack: str | None) -> int:
    """Layers of `stack` in `model` (0 when it has none)."""
    return layer_counts(list(model.tensors)).get(stack or "", 0)


def model_problems(data: Any, recipe_dir: Path | None) -> list[Problem]:
    """A problem for each model of raw recipe data that cannot be read (each model once)."""
    places = raw_model_places(data)
    base = next((ref for where, ref in places if where == "base_model"), None)
    resolve = file_resolver(recipe_dir, base)
    problems, seen = [], set()
    for where, ref in places:
        if ref in seen:
            continue
        seen.add(ref)
        try:
            read_model(resolve, ref)
        except MergecliError as exc:
            problems.append(Problem(where, exc.message, exc.hint, code=exc.exit_code))
    return problems
