"""Fuzzing: random recipes and random headers give only our errors, never a crash."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mergecli.errors import CorruptFileError, RecipeError
from mergecli.io.header import parse_header, read_header
from mergecli.recipe import parse_recipe

KEYS = [
    "merge_method",
    "models",
    "model",
    "slices",
    "sources",
    "layer_range",
    "parameters",
    "weight",
    "density",
    "t",
    "base_model",
    "dtype",
    "out_dtype",
    "tokenizer_source",
    "tokenizer",
    "filter",
    "value",
    "seed",
    "tags",
    "name",
    "post",
    "lines",
    "alpha",
    "beta",
    "modules",
    "normalize",
]
METHODS = ["linear", "ties", "slerp", "passthrough", "dare_ties", "karcher", "nope"]
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 40),
    st.floats(allow_nan=True),
    st.sampled_from(METHODS),
    st.text(max_size=8),
    st.sampled_from(["a/b", "./x", "org/m@main", "bf16", "float32", "union", "base"]),
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=6), inner, max_size=5)
    ),
    max_leaves=25,
)
recipes = st.dictionaries(st.sampled_from(KEYS), values, max_size=7)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(recipes)
def test_random_recipe_structures_raise_only_recipe_errors(data: dict[str, object]) -> None:
    text = yaml.safe_dump(data)
    try:
        parse_recipe(text)
    except RecipeError as exc:
        assert exc.exit_code == 2 and exc.problems
        for problem in exc.problems:
            assert problem.render()


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_random_text_raises_only_recipe_errors(text: str) -> None:
    try:
        parse_recipe(text)
    except RecipeError as exc:
        assert exc.problems


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_never_crash_the_header_reader(data: bytes) -> None:
    try:
        header = parse_header(data, 64, "fuzz")
    except CorruptFileError as exc:
        assert exc.message.startswith("fuzz: ")
    else:
        assert all(0 <= e.begin <= e.end <= 64 for e in header.entries.values())


def test_a_valid_empty_header_parses() -> None:
    assert parse_header(b"{}", 0, "x").entries == {}


entries = st.dictionaries(
    st.text(max_size=5),
    st.fixed_dictionaries(
        {},
        optional={
            "dtype": st.sampled_from(["F32", "BF16", "I8", "X", 3]),
            "shape": st.lists(st.integers(-2, 5), max_size=3) | st.text(max_size=2),
            "data_offsets": st.lists(st.integers(-5, 200), max_size=3),
        },
    ),
    max_size=4,
)


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(entries, st.integers(0, 200))
def test_random_headers_parse_or_raise_corrupt(
    tmp_path: Path, doc: dict[str, object], data_size: int
) -> None:
    body = json.dumps(doc).encode()
    path = tmp_path / "f.safetensors"
    path.write_bytes(struct.pack("<Q", len(body)) + body + b"\0" * data_size)
    try:
        header = read_header(path)
    except CorruptFileError as exc:
        assert str(path) in exc.message
    else:
        for entry in header.entries.values():
            assert 0 <= entry.begin <= entry.end <= data_size
