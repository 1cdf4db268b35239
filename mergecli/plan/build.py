"""The plan: every output tensor with its inputs, method, resolved parameters and shard.

Built from the recipe, configs and safetensors headers only; no weight is read. Every
problem (missing tensors, shape mismatches, layer ranges out of bounds, parameters that do
not resolve) is collected and raised together."""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from mergecli import methods
from mergecli.errors import Problem, RecipeError
from mergecli.io.checkpoint import ModelInfo, TensorInfo
from mergecli.io.dtypes import CODE_TO_NAME, FLOAT_CODES, NAME_TO_CODE
from mergecli.methods.spec import MethodSpec
from mergecli.model.layers import is_pre_layer, layer_counts, split_layer
from mergecli.model.tying import Tying, find_tying, set_untied, word_embedding
from mergecli.plan.inputs import (
    LAYER_COUNT_KEYS,
    layer_section,
    load_models,
    main_stack_of,
    recipe_place,
    tokenizer_facts,
)
from mergecli.plan.params import lookup, unresolved
from mergecli.plan.post import apply_lines
from mergecli.plan.shards import DEFAULT_SHARD_BYTES, assign_shards
from mergecli.plan.types import InputRef, MergePlan, Section, TensorPlan
from mergecli.recipe.schema import ModelRef, Recipe
from mergecli.recipe.settings import Parameters
from mergecli.vocab.chat_template import resolve_template
from mergecli.vocab.planning import TokenizerFacts, plan_vocabulary
from mergecli.vocab.tokens import VocabPlan

DECODER_COUNT_KEYS = ("num_decoder_layers", "decoder_layers")


MAX_TENSOR_PROBLEMS = 3


_POSITIONAL = re.compile(r"position|token_type|patch|pos_emb")


def build_plan(
    recipe: Recipe,
    recipe_dir: Path | None = None,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    seed: int | None = None,
) -> MergePlan:
    """Resolve every model, read configs and headers, and plan each output tensor."""
    spec = methods.get(recipe.merge_method)
    assert spec is not None, "recipe was checked against the registry"
    refs = recipe.referenced_models()
    models, problems = load_models(recipe, refs, recipe_dir)
    if problems:
        raise RecipeError(problems)
    builder = _Builder(recipe, spec, refs, models, [tokenizer_facts(m) for m in models])
    tensors = apply_lines(recipe, builder.build())
    builder.summarize_mismatches()
    if builder.problems:
        raise RecipeError(builder.problems)
    tensors, shard_names = assign_shards(tensors, shard_bytes)
    return MergePlan(
        recipe=recipe,
        method=spec,
        models=tuple(models),
        refs=tuple(refs),
        template=builder.template,
        tensors=tuple(tensors),
        shard_names=shard_names,
        config=builder.output_config(tensors),
        seed=seed if seed is not None else (recipe.seed if recipe.seed is not None else 0),
        notes=tuple(builder.notes),
        vocab=builder.vocab,
        chat_template=builder.chat_template,
    )


@dataclass(frozen=True)
class _Source:
    """One input of an output group: model index, first layer, its parameter block."""

    model: int
    start: int
    params: Parameters | None
    where: str


@dataclass(frozen=True)
class _Group:
    """An output slice (the models form is one group covering every layer)."""

    sources: tuple[_Source, ...]
    length: int
    params: Parameters | None
    base: int | None
    where: str


class _Builder:
    """Collects tensor plans and problems for one recipe."""

    def __init__(
        self,
        recipe: Recipe,
        spec: MethodSpec,
        refs: list[ModelRef],
        models: list[ModelInfo],
        facts: list[TokenizerFacts],
    ) -> None:
        self.recipe, self.spec, self.refs, self.models = recipe, spec, refs, models
        self.facts = facts
        self.vocab: VocabPlan | None = None
        self.chat_template: str | None = None
        self.problems: list[Problem] = []
        self.notes: list[str] = []
        self.template = self._template_index()
        self.main_stacks = [main_stack_of(m) for m in models]
        self.stack = self.main_stacks[self.template]
        self.depth = layer_counts(list(models[self.template].tensors)).get(self.stack or "", 0)
        self.layer_sources: list[tuple[int, int]] = []
        self._mismatches: dict[int, int] = {}
        self.tying = Tying((), {}, {})

    def _index(self, ref: ModelRef) -> int:
        return self.refs.index(ref)

    def _template_index(self) -> int:
        recipe = self.recipe
        if recipe.base_model is not None:
            return self._index(recipe.base_model)
        if recipe.models:
            return self._index(recipe.models[0].model)
        return self._index(recipe.slices[0].sources[0].model) if recipe.slices else 0

    # groups -----------------------------------------------------------------

    def groups(self) -> list[_Group]:
        recipe = self.recipe
        if recipe.models:
            sources = [
                _Source(self._index(m.model), 0, m.parameters, f"models[{i}]")
                for i, m in enumerate(recipe.models)
            ]
            base = self._index(recipe.base_model) if recipe.base_model else None
            return [_Group(tuple(sources), self.depth, None, base, "models")]
        groups = []
        for i, out_slice in enumerate(recipe.slices or []):
            sources = [
                _Source(
                    self._index(s.model),
                    s.layer_range[0],
                    s.parameters,
                    f"slices[{i}].sources[{j}]",
                )
                for j, s in enumerate(out_slice.sources)
            ]
            base_ref = out_slice.base_model or recipe.base_model
            base = self._index(base_ref) if base_ref else None
            first = out_slice.sources[0].layer_range
            groups.append(
                _Group(
                    tuple(sources), first[1] - first[0], out_slice.parameters, base, f"slices[{i}]"
                )
            )
            self._check_ranges(i, out_slice.sources)
        return groups

    def _check_ranges(self, i: int, sources: Sequence[Any]) -> None:
        for j, source in enumerate(sources):
            index = self._index(source.model)
            model = self.models[index]
            counts = layer_counts(list(model.tensors))
            depth = counts.get(self.main_stacks[index] or "", 0)
            start, end = source.layer_range
            if end > depth:
                self.problems.append(
                    Problem(
                        f"slices[{i}].sources[{j}].layer_range",
                        f"layer_range [{start}, {end}] is out of bounds: {model.label} has "
                        f"{depth} layers (0..{depth - 1})",
                        f"the end is exclusive; the whole model is [0, {depth}]",
                    )
                )

    # tensors ----------------------------------------------------------------

    def _check_same_tensors(self, group: _Group) -> None:
        """In the models form every input must hold exactly the template's tensors."""
        template = self.models[self.template]
        names = set(template.tensors) | set(self.tying.heads)
        for source in group.sources:
            extra = sorted(set(self.models[source.model].tensors) - names)
            if extra:
                model = self.models[source.model]
                self.problems.append(
                    Problem(
                        source.where,
                        f"{model.label} has {len(extra)} tensors that {template.label} lacks "
                        f"(e.g. `{extra[0]}`)",
                        "models must share an architecture and layer count; to combine "
                        "different depths use `slices:`",
                        code=4,
                    )
                )

    def _prepare(self, groups: list[_Group]) -> None:
        """Per-model parameters a method derives from files (e.g. mwa's trainer_state.json)."""
        self.prepared: dict[int, dict[str, Any]] = {}
        if self.spec.prepare is None or self.spec.reads is None:
            return
        sources = [s for g in groups for s in g.sources]
        states = [self._read_json(s.model, self.spec.reads) for s in sources]
        params = {}
        for spec in self.spec.scoped("global"):
            value = lookup(spec.name, "", 0.0, [self.recipe.parameters])
            params[spec.name] = spec.default if value is None else value
        try:
            prepared = self.spec.prepare(states, params)
        except ValueError as exc:
            self.problems.append(
                Problem("models", str(exc), f"each input needs a {self.spec.reads}", code=4)
            )
            return
        for source, values in zip(sources, prepared):
            self.prepared[source.model] = values

    def _read_json(self, model: int, filename: str) -> dict[str, Any] | None:
        import json

        source = self.models[model].source
        if filename not in source.files():
            return None
        data = json.loads(source.local(filename).read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else None

    def _check_architectures(self, groups: list[_Group]) -> None:
        """Every input must be the same `model_type` as the base (or first) model."""
        template = self.models[self.template]
        expected = template.config.get("model_type")
        seen: set[int] = set()
        for source in (s for g in groups for s in g.sources):
            found = self.models[source.model].config.get("model_type")
            if source.model in seen or None in (expected, found) or found == expected:
                continue
            seen.add(source.model)
            self.problems.append(
                Problem(
                    source.where,
                    f"{self.models[source.model].label} is a `{found}` model but "
                    f"{template.label} is `{expected}`",
                    "merge models of one architecture (same model_type in config.json)",
                    code=4,
                )
            )

    def build(self) -> list[TensorPlan]:
        groups = self.groups()
        used = sorted(
            {s.model for g in groups for s in g.sources}
            | {g.base for g in groups if g.base is not None}
        )
        self.tying = find_tying(self.models, used)
        self._plan_vocab(used)
        if self.recipe.chat_template is not None:
            text, problem = resolve_template(
                self.recipe.chat_template, self.refs, self.models, used
            )
            self.chat_template = text
            self.problems += [problem] if problem else []
        self._check_architectures(groups)
        self._prepare(groups)
        if self.recipe.models:
            self._check_same_tensors(groups[0])
        if self.problems:
            return []
        template = self.models[self.template]
        pre = [n for n in template.tensors if split_layer(n) is None and is_pre_layer(n)]
        post = [n for n in template.tensors if split_layer(n) is None and not is_pre_layer(n)]
        heads = self.tying.heads
        post = [n for n in post if n not in heads or not self.tying.out_tied]
        if not self.tying.out_tied:
            post += [h for h in heads if h not in template.tensors]
        out: list[TensorPlan] = []
        for name in pre:
            out += self._plan(name, groups[0], [name] * len(groups[0].sources), "pre", None, 0.0)
        out += self._plan_layers(groups)
        for name in post:
            out += self._plan(name, groups[-1], [name] * len(groups[-1].sources), "post", None, 1.0)
        out += self._plan_other_stacks(groups[0])
        return out

    def _plan_vocab(self, used: list[int]) -> None:
        where = {i: recipe_place(self.recipe, ref) for i, ref in enumerate(self.refs)}
        facts = dict(enumerate(self.facts))
        self.vocab, problems = plan_vocabulary(
            self.recipe, self.refs, self.models, self.template, used, facts, where
        )
        self.problems += problems
        params = self.recipe.parameters or {}
        if self.vocab is not None and self.spec.masks is not None and "save_masks" in params:
            self.problems.append(
                Problem(
                    "parameters.save_masks",
                    "masks cannot be saved when embedding rows are re-indexed",
                    "merge models with one vocabulary, or drop save_masks",
                )
            )

    def _is_vocab(self, name: str) -> bool:
        """Embedding, head and other per-token tensors (re-indexed with the vocabulary)."""
        if self.vocab is None or split_layer(name) is not None:
            return False
        template = self.models[self.template]
        embedding = self.tying.embeddings.get(self.template)
        if name == embedding or name in self.tying.heads:
            return True
        info = template.tensors.get(name)
        rows = template.tensors[embedding].shape[0] if embedding else -1
        return info is not None and info.shape[:1] == (rows,) and not _POSITIONAL.search(name)

    def _vocab_names(self, name: str) -> dict[int, str]:
        """The tensor holding `name` in every model a re-indexed row may come from."""
        assert self.vocab is not None
        models = {*self.vocab.maps, *(m for m, _ in self.vocab.overrides.values() if m is not None)}
        out = {}
        for model in sorted(models):
            found = self.tying.name_in(model, name)
            if found not in self.models[model].tensors and name in self.tying.heads:
                found = word_embedding(self.models[model]) or found
            out[model] = found
        return out

    def _layer_template_names(self, model: int, index: int) -> list[tuple[str, str]]:
        """(stack prefix, rest) of the tensors of layer `index` in the main stack of `model`."""
        out = []
        for name in self.models[model].tensors:
            split = split_layer(name)
            if (
                split is not None
                and split.index == index
                and split.stack == self.main_stacks[model]
            ):
                out.append((split.stack, split.rest))
        return out

    def _plan_layers(self, groups: list[_Group]) -> list[TensorPlan]:
        out: list[TensorPlan] = []
        out_layer = 0
        out_stack = self.stack
        for group in groups:
            for k in range(group.length):
                t = k / (group.length - 1) if group.length > 1 else 1.0
                names = self._layer_template_names(
                    group.sources[0].model, group.sources[0].start + k
                )
                self.layer_sources.append((group.sources[0].model, group.sources[0].start + k))
                for _, rest in names:
                    inputs = []
                    for source in group.sources:
                        stack = self.main_stacks[source.model]
                        inputs.append(f"{stack}.{source.start + k}.{rest}")
                    out_name = f"{out_stack}.{out_layer}.{rest}"
                    out += self._plan(out_name, group, inputs, "layer", out_layer, t)
                out_layer += 1
        return out

    def _plan_other_stacks(self, group: _Group) -> list[TensorPlan]:
        """Layer tensors of secondary stacks (a T5 encoder, a vision tower): merged name for
        name over the sources of the first group; slices only reshape the main stack."""
        template = self.models[self.template]
        counts = layer_counts(list(template.tensors))
        out: list[TensorPlan] = []
        for name in template.tensors:
            split = split_layer(name)
            if split is None or split.stack == self.stack:
                continue
            depth = counts[split.stack]
            t = split.index / (depth - 1) if depth > 1 else 1.0
            out += self._plan(name, group, [name] * len(group.sources), "layer", split.index, t)
        return out

    def _mismatch(self, model: int, problem: Problem) -> None:
        """Record a tensor problem; past the third one per model only count them."""
        seen = self._mismatches.get(model, 0)
        self._mismatches[model] = seen + 1
        if seen < MAX_TENSOR_PROBLEMS:
            self.problems.append(problem)

    def summarize_mismatches(self) -> None:
        """Add one line per model whose further tensor problems were only counted."""
        for model, count in self._mismatches.items():
            if count > MAX_TENSOR_PROBLEMS:
                self.problems.append(
                    Problem(
                        "",
                        f"... and {count - MAX_TENSOR_PROBLEMS} more tensors of {self.models[model].label} "
                        "are missing or have other shapes",
                        "",
                        code=4,
                    )
                )

    def _input(
        self, model: int, name: str, shape: tuple[int, ...] | None, group: str
    ) -> TensorInfo | None:
        info = self.models[model].tensors.get(name)
        label = self.models[model].label
        if info is None:
            self._mismatch(
                model,
                Problem(
                    group,
                    f"tensor `{name}` is missing from {label}",
                    "all inputs need the same tensors",
                    code=4,
                ),
            )
            return None
        if shape is not None and info.shape != shape:
            self._mismatch(
                model,
                Problem(
                    group,
                    f"tensor `{name}` has shape {list(info.shape)} in {label} but "
                    f"{list(shape)} in {self.models[self.template].label}",
                    "models must share an architecture and size (vocabulary sizes too)",
                    code=4,
                ),
            )
            return None
        return info

    def _plan(
        self,
        out_name: str,
        group: _Group,
        names: list[str],
        section: Section,
        layer: int | None,
        t: float,
    ) -> list[TensorPlan]:
        names = [self.tying.name_in(s.model, n) for s, n in zip(group.sources, names)]
        template_info = self._template_info(group, names)
        if template_info is None:
            return []
        shape = template_info.shape
        vocab = self._is_vocab(out_name)
        check = None if vocab else shape
        use_base = self.spec.uses_base and group.base is not None
        picked = [
            (s, n) for s, n in zip(group.sources, names) if not (use_base and s.model == group.base)
        ]
        infos = [self._input(s.model, n, check, s.where) for s, n in picked]
        base_ref = None
        if use_base:
            assert group.base is not None
            base_name = self.tying.name_in(group.base, self._base_name(group, names, out_name))
            if self._input(group.base, base_name, check, "base_model") is not None:
                base_ref = InputRef(group.base, base_name)
        if any(i is None for i in infos) or (use_base and base_ref is None):
            return []
        if vocab:
            return self._plan_vocab_tensor(out_name, shape, picked, base_ref, group, section, t)
        dtype = self._out_dtype(template_info.dtype)
        is_float = template_info.dtype in FLOAT_CODES
        if not is_float:
            source = base_ref or InputRef(picked[0][0].model, picked[0][1])
            return [
                TensorPlan(
                    out_name,
                    shape,
                    template_info.dtype,
                    section,
                    layer,
                    t,
                    (source,),
                    None,
                    {},
                    ({},),
                    True,
                )
            ]
        params, per_model = self._resolve(out_name, group, picked, t)
        if params is None or per_model is None:
            return []
        inputs = tuple(InputRef(s.model, n) for s, n in picked)
        is_copy = (
            self.spec.name == "passthrough"
            and params.get("scale") in (None, 1)
            and dtype == template_info.dtype
        )
        return [
            TensorPlan(
                out_name,
                shape,
                dtype,
                section,
                layer,
                t,
                inputs,
                base_ref,
                params,
                per_model,
                is_copy,
            )
        ]

    def _plan_vocab_tensor(
        self,
        out_name: str,
        shape: tuple[int, ...],
        picked: list[tuple[_Source, str]],
        base: InputRef | None,
        group: _Group,
        section: Section,
        t: float,
    ) -> list[TensorPlan]:
        """A per-token tensor: rows re-indexed to the output vocabulary, other dims equal."""
        assert self.vocab is not None
        names = self._vocab_names(out_name)
        for model, name in names.items():
            info = self.models[model].tensors.get(name)
            if info is not None and info.shape[1:] != shape[1:]:
                self._mismatch(
                    model,
                    Problem(
                        "models",
                        f"tensor `{name}` has shape {list(info.shape)} in "
                        f"{self.models[model].label} but {list(shape)} in "
                        f"{self.models[self.template].label} (beyond the vocabulary dimension)",
                        "models must share an architecture and hidden size",
                        code=4,
                    ),
                )
                return []
        params, per_model = self._resolve(out_name, group, picked, t)
        if params is None or per_model is None:
            return []
        dtype = self._out_dtype(self.models[picked[0][0].model].tensors[picked[0][1]].dtype)
        inputs = tuple(InputRef(s.model, n) for s, n in picked)
        out_shape = (self.vocab.rows, *shape[1:])
        plan = TensorPlan(
            out_name, out_shape, dtype, section, None, t, inputs, base, params, per_model, False
        )
        return [replace(plan, vocab_names=names)]

    def _template_info(self, group: _Group, names: list[str]) -> TensorInfo | None:
        first = group.sources[0]
        return self._input(first.model, names[0], None, first.where)

    def _base_name(self, group: _Group, names: list[str], out_name: str) -> str:
        for source, name in zip(group.sources, names):
            if source.model == group.base:
                return name
        return out_name if out_name in self.tying.heads else names[0]

    def _out_dtype(self, input_code: str) -> str:
        name = self.recipe.out_dtype or self.recipe.dtype
        if name is None or input_code not in FLOAT_CODES:
            return input_code
        return NAME_TO_CODE[name]

    def _resolve(
        self, out_name: str, group: _Group, picked: list[tuple[_Source, str]], t: float
    ) -> tuple[dict[str, Any] | None, tuple[dict[str, Any], ...] | None]:
        top = self.recipe.parameters
        params: dict[str, Any] = {}
        ok = True
        for spec in self.spec.scoped("global"):
            value = lookup(spec.name, out_name, t, [group.params, top])
            if value is None:
                value = spec.default
            if value is None and spec.required:
                ok = False
                self.problems.append(unresolved(spec.name, out_name, "parameters"))
            params[spec.name] = value
        per_model = []
        for source, name in picked:
            values: dict[str, Any] = dict(self.prepared.get(source.model, {}))
            for spec in self.spec.scoped("model"):
                if spec.name in values:
                    continue
                value = lookup(spec.name, name, t, [source.params, group.params, top])
                if value is None:
                    value = spec.default
                if value is None and spec.required:
                    ok = False
                    self.problems.append(
                        unresolved(spec.name, out_name, f"{source.where}.parameters")
                    )
                values[spec.name] = value
            per_model.append(values)
            if ok and self.spec.check is not None:
                message = self.spec.check(params, values)
                problem = Problem(f"{source.where}.parameters", message or "", "")
                if message and problem not in self.problems:
                    self.problems.append(problem)
                ok = ok and not message
        return (params, tuple(per_model)) if ok else (None, None)

    # config -----------------------------------------------------------------

    def output_config(self, tensors: Sequence[TensorPlan]) -> dict[str, Any]:
        config = copy.deepcopy(self.models[self.template].config)
        float_codes = [t.dtype for t in tensors if t.dtype in FLOAT_CODES]
        if float_codes:
            dtype_name = CODE_TO_NAME[max(set(float_codes), key=float_codes.count)]
            keys = [k for k in ("torch_dtype", "dtype") if k in config] or ["torch_dtype"]
            for key in keys:
                config[key] = dtype_name
        if self.recipe.slices:
            self._update_layer_fields(config)
        if self.vocab is not None:
            section = layer_section(config, self.stack or "")
            if section.get("vocab_size") != self.vocab.rows:
                self.notes.append(
                    f"vocabulary: {len(self.vocab.tokens)} tokens "
                    f"({len(self.vocab.new_tokens)} added by the union), "
                    f"{self.vocab.rows} embedding rows"
                )
            section["vocab_size"] = self.vocab.rows
        if not self.tying.out_tied and any(self.tying.tied.values()):
            set_untied(config)
            self.notes.append(
                "embeddings: tied and untied inputs; the output is untied and its head merges "
                "each model's head (a tied model's embedding matrix)"
            )
        return config

    def _update_layer_fields(self, config: dict[str, Any]) -> None:
        """Set the new depth and reorder per-layer lists (`layer_types`, ...) in the config
        section that describes the main stack (`text_config` of a multimodal model)."""
        new_depth = len(self.layer_sources)
        section = layer_section(config, self.stack or "")
        keys = [k for k in DECODER_COUNT_KEYS if "decoder" in (self.stack or "") and k in section]
        for key in keys or LAYER_COUNT_KEYS:
            if section.get(key) == self.depth:
                section[key] = new_depth
        for key, value in list(section.items()):
            if isinstance(value, list) and len(value) == self.depth:
                section[key] = [value[index] for _, index in self.layer_sources]
        if new_depth != self.depth:
            self.notes.append(
                f"layers: {self.depth} in the base/first model -> {new_depth} in the output"
            )
