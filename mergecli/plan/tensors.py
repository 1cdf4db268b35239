"""Plan one output tensor: its inputs checked against the headers, its dtype, parameters,
and whether it is a plain copy or a per-token tensor re-indexed to the output vocabulary."""

from __future__ import annotations

import re
from collections.abc import Sequence

from mergecli.errors import Problem
from mergecli.io.checkpoint import TensorInfo
from mergecli.io.dtypes import FLOAT_CODES, NAME_TO_CODE
from mergecli.model.layers import split_layer
from mergecli.model.tying import word_embedding
from mergecli.plan.context import Context, Findings
from mergecli.plan.groups import Group, Source
from mergecli.plan.params import resolve_params
from mergecli.plan.types import InputRef, Section, TensorPlan

_POSITIONAL = re.compile(r"position|token_type|patch|pos_emb")


def plan_tensor(
    ctx: Context,
    found: Findings,
    out_name: str,
    group: Group,
    names: Sequence[str],
    section: Section,
    layer: int | None,
    t: float,
) -> list[TensorPlan]:
    """The plan of output tensor `out_name` made from `names` (one per source of `group`),
    or nothing when a problem was found (recorded in `found`)."""
    tying, spec = ctx.tying, ctx.inputs.spec
    names = [tying.name_in(s.model, n) for s, n in zip(group.sources, names)]
    first = group.sources[0]
    template_info = input_info(ctx, found, first.model, names[0], None, first.where)
    if template_info is None:
        return []
    vocab = is_vocab(ctx, out_name)
    check = None if vocab else template_info.shape
    use_base = spec.uses_base and group.base is not None
    picked = [
        (s, n) for s, n in zip(group.sources, names) if not (use_base and s.model == group.base)
    ]
    infos = [input_info(ctx, found, s.model, n, check, s.where) for s, n in picked]
    base_ref = _base_ref(ctx, found, group, names, out_name, check) if use_base else None
    if any(i is None for i in infos) or (use_base and base_ref is None):
        return []
    if vocab:
        return _vocab_tensor(
            ctx, found, out_name, template_info, picked, base_ref, group, section, t
        )
    if template_info.dtype not in FLOAT_CODES:
        source = base_ref or InputRef(picked[0][0].model, picked[0][1])
        return [_copy(out_name, template_info, section, layer, t, source)]
    resolved = resolve_params(ctx, found, out_name, group, picked, t)
    if resolved is None:
        return []
    params, per_model = resolved
    dtype = out_dtype(ctx, template_info.dtype)
    copy = (
        spec.copies is not None and spec.copies(params, per_model) and dtype == template_info.dtype
    )
    inputs = tuple(InputRef(s.model, n) for s, n in picked)
    return [
        TensorPlan(
            name=out_name,
            shape=template_info.shape,
            dtype=dtype,
            section=section,
            layer=layer,
            t=t,
            inputs=inputs,
            base=base_ref,
            params=params,
            per_model=per_model,
            copy=copy,
        )
    ]


def _copy(
    out_name: str, info: TensorInfo, section: Section, layer: int | None, t: float, source: InputRef
) -> TensorPlan:
    """A tensor that is not floating point: copied from the base (or first) model."""
    return TensorPlan(
        name=out_name,
        shape=info.shape,
        dtype=info.dtype,
        section=section,
        layer=layer,
        t=t,
        inputs=(source,),
        base=None,
        params={},
        per_model=({},),
        copy=True,
    )


def _base_ref(
    ctx: Context,
    found: Findings,
    group: Group,
    names: Sequence[str],
    out_name: str,
    check: tuple[int, ...] | None,
) -> InputRef | None:
    assert group.base is not None
    base_name = ctx.tying.name_in(group.base, base_name_of(ctx, group, names, out_name))
    if input_info(ctx, found, group.base, base_name, check, "base_model") is None:
        return None
    return InputRef(group.base, base_name)


def input_info(
    ctx: Context,
    found: Findings,
    model: int,
    name: str,
    shape: tuple[int, ...] | None,
    where: str,
) -> TensorInfo | None:
    """The header entry of `name` in `model`, checked to have `shape` (when given)."""
    models = ctx.inputs.models
    info = models[model].tensors.get(name)
    label = models[model].label
    if info is None:
        message = f"tensor `{name}` is missing from {label}"
        hint = "all inputs need the same tensors"
        if ctx.inputs.recipe.models:
            hint += "; or merge name for name with `tensor_names: intersection` (or `union`)"
        found.mismatch(model, Problem(where, message, hint, code=4))
        return None
    if shape is not None and info.shape != shape:
        message = (
            f"tensor `{name}` has shape {list(info.shape)} in {label} but "
            f"{list(shape)} in {models[ctx.inputs.template].label}"
        )
        hint = "models must share an architecture and size (vocabulary sizes too)"
        found.mismatch(model, Problem(where, message, hint, code=4))
        return None
    return info


def base_name_of(ctx: Context, group: Group, names: Sequence[str], out_name: str) -> str:
    """The name of the tensor in the base model that `out_name` is merged onto."""
    for source, name in zip(group.sources, names):
        if source.model == group.base:
            return name
    return out_name if out_name in ctx.tying.heads else names[0]


def out_dtype(ctx: Context, input_code: str) -> str:
    """The output dtype code of a tensor whose template input is `input_code`."""
    recipe = ctx.inputs.recipe
    name = recipe.out_dtype or recipe.dtype
    if name is None or input_code not in FLOAT_CODES:
        return input_code
    return NAME_TO_CODE[name]


def is_vocab(ctx: Context, name: str) -> bool:
    """Embedding, head and other per-token tensors (re-indexed with the vocabulary)."""
    if ctx.vocab is None or split_layer(name) is not None:
        return False
    template = ctx.inputs.models[ctx.inputs.template]
    embedding = ctx.tying.embeddings.get(ctx.inputs.template)
    if name == embedding or name in ctx.tying.heads:
        return True
    info = template.tensors.get(name)
    rows = template.tensors[embedding].shape[0] if embedding else -1
    return info is not None and info.shape[:1] == (rows,) and not _POSITIONAL.search(name)


def _vocab_tensor(
    ctx: Context,
    found: Findings,
    out_name: str,
    template_info: TensorInfo,
    picked: list[tuple[Source, str]],
    base: InputRef | None,
    group: Group,
    section: Section,
    t: float,
) -> list[TensorPlan]:
    """A per-token tensor: rows re-indexed to the output vocabulary, other dims equal."""
    assert ctx.vocab is not None
    shape = template_info.shape
    names = vocab_names(ctx, out_name)
    if not _rows_alike(ctx, found, names, shape):
        return []
    resolved = resolve_params(ctx, found, out_name, group, picked, t)
    if resolved is None:
        return []
    params, per_model = resolved
    first = ctx.inputs.models[picked[0][0].model].tensors[picked[0][1]]
    inputs = tuple(InputRef(s.model, n) for s, n in picked)
    plan = TensorPlan(
        name=out_name,
        shape=(ctx.vocab.rows, *shape[1:]),
        dtype=out_dtype(ctx, first.dtype),
        section=section,
        layer=None,
        t=t,
        inputs=inputs,
        base=base,
        params=params,
        per_model=per_model,
        copy=False,
        vocab_names=names,
    )
    return [plan]


def _rows_alike(
    ctx: Context, found: Findings, names: dict[int, str], shape: tuple[int, ...]
) -> bool:
    models = ctx.inputs.models
    for model, name in names.items():
        info = models[model].tensors.get(name)
        if info is not None and info.shape[1:] != shape[1:]:
            message = (
                f"tensor `{name}` has shape {list(info.shape)} in {models[model].label} but "
                f"{list(shape)} in {models[ctx.inputs.template].label} (beyond the "
                "vocabulary dimension)"
            )
            hint = "models must share an architecture and hidden size"
            found.mismatch(model, Problem("models", message, hint, code=4))
            return False
    return True


def vocab_names(ctx: Context, name: str) -> dict[int, str]:
    """The tensor holding `name` in every model a re-indexed row may come from."""
    vocab = ctx.vocab
    assert vocab is not None
    models = {*vocab.maps, *(m for m, _ in vocab.overrides.values() if m is not None)}
    out = {}
    for model in sorted(models):
        found = ctx.tying.name_in(model, name)
        if found not in ctx.inputs.models[model].tensors and name in ctx.tying.heads:
            found = word_embedding(ctx.inputs.models[model]) or found
        out[model] = found
    return out
