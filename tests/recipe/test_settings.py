"""Gradient/filter evaluation, layer names, byte sizes."""

from __future__ import annotations

import pytest

from mergecli.model.layers import is_pre_layer, layer_counts, split_layer
from mergecli.recipe.settings import Condition, evaluate
from mergecli.units import parse_size


@pytest.mark.parametrize(
    ("setting", "t", "expected"),
    [
        (0.3, 0.7, 0.3),
        ([0.0, 1.0], 0.25, 0.25),
        ([0, 0.5, 1], 0.75, 0.75),
        # 5 points at t=0.3: position 1.2 -> 0.8*g[1] + 0.2*g[2] = 0.8*0.5 + 0.2*0.3
        ([0, 0.5, 0.3, 0.7, 1], 0.3, 0.46),
        ([2.0, 4.0], 1.0, 4.0),
        (["a", "b", "c"], 0.9, "b"),  # non-numeric: nearest-lower entry
        (["a", "b", "c"], 1.0, "c"),
    ],
)
def test_gradient_values(setting: object, t: float, expected: object) -> None:
    value = evaluate(setting, "model.layers.0.mlp.up_proj.weight", t)
    if isinstance(expected, float):
        assert value == pytest.approx(expected, abs=1e-12)
    else:
        assert value == expected


def test_first_matching_filter_wins_and_may_be_a_gradient() -> None:
    setting = [
        Condition(filter="self_attn", value=[0.0, 1.0]),
        Condition(filter="mlp", value=2.0),
        Condition(value=9.0),
    ]
    assert evaluate(setting, "model.layers.3.self_attn.q_proj.weight", 0.5) == 0.5
    assert evaluate(setting, "model.layers.3.mlp.up_proj.weight", 0.5) == 2.0
    assert evaluate(setting, "model.norm.weight", 0.5) == 9.0


def test_no_matching_filter_gives_none() -> None:
    assert evaluate([Condition(filter="mlp", value=1.0)], "lm_head.weight", 0.0) is None
    assert evaluate([Condition(filter="*", value=1.0)], "lm_head.weight", 0.0) == 1.0


@pytest.mark.parametrize(
    ("name", "stack", "index", "rest"),
    [
        ("model.layers.12.self_attn.q_proj.weight", "model.layers", 12, "self_attn.q_proj.weight"),
        ("transformer.h.3.attn.c_attn.weight", "transformer.h", 3, "attn.c_attn.weight"),
        (
            "gpt_neox.layers.0.mlp.dense_h_to_4h.bias",
            "gpt_neox.layers",
            0,
            "mlp.dense_h_to_4h.bias",
        ),
        (
            "encoder.block.2.layer.1.DenseReluDense.wi.weight",
            "encoder.block",
            2,
            "layer.1.DenseReluDense.wi.weight",
        ),
        (
            "bert.encoder.layer.5.output.dense.weight",
            "bert.encoder.layer",
            5,
            "output.dense.weight",
        ),
        ("blocks.7.ln.weight", "blocks", 7, "ln.weight"),
    ],
)
def test_layer_names(name: str, stack: str, index: int, rest: str) -> None:
    split = split_layer(name)
    assert split is not None
    assert (split.stack, split.index, split.rest) == (stack, index, rest)
    assert split.with_index(index) == name


@pytest.mark.parametrize(
    "name", ["model.embed_tokens.weight", "lm_head.weight", "model.norm.weight", "shared.weight"]
)
def test_non_layer_names(name: str) -> None:
    assert split_layer(name) is None


def test_pre_and_post_layer_tensors() -> None:
    assert is_pre_layer("model.embed_tokens.weight")
    assert is_pre_layer("transformer.wte.weight")
    assert not is_pre_layer("lm_head.weight")
    assert not is_pre_layer("model.norm.weight")


def test_layer_counts_per_stack() -> None:
    names = ["encoder.block.0.a", "encoder.block.5.a", "decoder.block.2.b", "shared.weight"]
    assert layer_counts(names) == {"encoder.block": 6, "decoder.block": 3}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("5GB", 5 * 10**9),
        ("500MB", 500 * 10**6),
        ("1.5GiB", 3 * 2**29),
        ("123", 123),
        ("2 kb", 2000),
    ],
)
def test_sizes(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["5XB", "", "-1GB", "0"])
def test_bad_sizes(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)
