"""The output's config.json: the template's, with dtype, depth, per-layer lists, vocabulary
size and tying updated; and the notes that tell the user what changed."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

from mergecli.io.dtypes import CODE_TO_NAME, FLOAT_CODES
from mergecli.model.tying import set_untied
from mergecli.plan.context import Context
from mergecli.plan.inputs import LAYER_COUNT_KEYS, layer_section
from mergecli.plan.types import TensorPlan
from mergecli.plan.walk import LayerSource
from mergecli.recipe.parts import parts

DECODER_COUNT_KEYS = ("num_decoder_layers", "decoder_layers")


def output_config(
    ctx: Context, tensors: Sequence[TensorPlan], layers: Sequence[LayerSource]
) -> tuple[dict[str, Any], list[str]]:
    """The output config and the notes about it."""
    inputs = ctx.inputs
    config = copy.deepcopy(inputs.models[inputs.template].config)
    notes: list[str] = []
    float_codes = [t.dtype for t in tensors if t.dtype in FLOAT_CODES]
    if float_codes:
        dtype_name = CODE_TO_NAME[max(set(float_codes), key=float_codes.count)]
        for key in [k for k in ("torch_dtype", "dtype") if k in config] or ["torch_dtype"]:
            config[key] = dtype_name
    if any(part.slices for part in parts(inputs.recipe)):
        notes += _update_layer_fields(ctx, config, layers)
    if ctx.vocab is not None:
        section = layer_section(config, inputs.stack or "")
        if section.get("vocab_size") != ctx.vocab.rows:
            notes.append(
                f"vocabulary: {len(ctx.vocab.tokens)} tokens "
                f"({len(ctx.vocab.new_tokens)} added by the union), "
                f"{ctx.vocab.rows} embedding rows"
            )
        section["vocab_size"] = ctx.vocab.rows
    if not ctx.tying.out_tied and any(ctx.tying.tied.values()):
        set_untied(config)
        notes.append(
            "embeddings: tied and untied inputs; the output is untied and its head merges "
            "each model's head (a tied model's embedding matrix)"
        )
    return config, notes


def _update_layer_fields(
    ctx: Context, config: dict[str, Any], layers: Sequence[LayerSource]
) -> list[str]:
    """Set the new depth and reorder per-layer lists (`layer_types`, ...) in the config
    section that describes the main stack (`text_config` of a multimodal model)."""
    stack, depth, new_depth = ctx.inputs.stack or "", ctx.inputs.depth, len(layers)
    section = layer_section(config, stack)
    keys = [k for k in DECODER_COUNT_KEYS if "decoder" in stack and k in section]
    for key in keys or LAYER_COUNT_KEYS:
        if section.get(key) == depth:
            section[key] = new_depth
    for key, value in list(section.items()):
        if isinstance(value, list) and len(value) == depth:
            section[key] = [value[index] for _, index in layers]
    if new_depth == depth:
        return []
    return [f"layers: {depth} in the base/first model -> {new_depth} in the output"]
