"""Recipe schema: mergekit recipes parse unchanged; each mistake gives a pinned message."""

from __future__ import annotations

import pytest

from mergecli import methods
from mergecli.errors import RecipeError
from mergecli.recipe import parse_recipe
from mergecli.recipe.schema import ModelRef, Recipe
from mergecli.recipe.settings import Condition

MERGEKIT_STYLE = {
    "linear": """
models:
  - model: psmathur/orca_mini_v3_13b
    parameters:
      weight: 1.0
  - model: WizardLM/WizardLM-13B-V1.2
    parameters:
      weight: 0.3
  - model: garage-bAInd/Platypus2-13B
    parameters:
      weight: 0.5
merge_method: linear
dtype: float16
""",
    "slerp": """
slices:
  - sources:
      - model: OpenPipe/mistral-ft-optimized-1218
        layer_range: [0, 32]
      - model: mlabonne/NeuralHermes-2.5-Mistral-7B
        layer_range: [0, 32]
merge_method: slerp
base_model: OpenPipe/mistral-ft-optimized-1218
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: bfloat16
""",
    "ties": """
models:
  - model: psmathur/orca_mini_v3_13b
    parameters:
      density: [1, 0.7, 0.1]
      weight: 1.0
  - model: garage-bAInd/Platypus2-13B
    parameters:
      density: 0.5
      weight: [0, 0.3, 0.7, 1]
merge_method: ties
base_model: TheBloke/Llama-2-13B-fp16
parameters:
  normalize: true
  int8_mask: true
dtype: float16
""",
    "passthrough": """
slices:
  - sources:
    - model: Qwen/Qwen2-7B-Instruct@main
      layer_range: [0, 20]
  - sources:
    - model: Qwen/Qwen2-7B-Instruct@main
      layer_range: [8, 28]
merge_method: passthrough
dtype: bfloat16
tokenizer_source: base
chat_template: "{{ messages }}"
""",
}


@pytest.mark.parametrize("name", sorted(MERGEKIT_STYLE))
def test_mergekit_recipes_parse_into_the_schema(name: str) -> None:
    import yaml

    recipe = Recipe.model_validate(yaml.safe_load(MERGEKIT_STYLE[name]))
    assert recipe.merge_method == name


@pytest.mark.parametrize("name", sorted(MERGEKIT_STYLE))
def test_mergekit_recipes_pass_every_check(name: str) -> None:
    assert parse_recipe(MERGEKIT_STYLE[name]).merge_method == name


def test_linear_and_passthrough_recipes_pass_every_check() -> None:
    recipe = parse_recipe(MERGEKIT_STYLE["linear"])
    assert recipe.dtype == "float16"
    assert [m.parameters["weight"] for m in recipe.models or []] == [1.0, 0.3, 0.5]
    franken = parse_recipe(MERGEKIT_STYLE["passthrough"])
    assert franken.slices is not None
    assert franken.slices[1].sources[0].model == ModelRef(
        path="Qwen/Qwen2-7B-Instruct", revision="main"
    )
    assert franken.slices[1].sources[0].layer_range == (8, 28)


def test_filter_conditions_become_typed() -> None:
    import yaml

    recipe = Recipe.model_validate(yaml.safe_load(MERGEKIT_STYLE["slerp"]))
    t = (recipe.parameters or {})["t"]
    assert t == [
        Condition(filter="self_attn", value=[0, 0.5, 0.3, 0.7, 1]),
        Condition(filter="mlp", value=[1, 0.5, 0.7, 0.3, 0]),
        Condition(value=0.5),
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("org/name", ModelRef(path="org/name")),
        ("org/name@v1.0", ModelRef(path="org/name", revision="v1.0")),
        ("org/name@main+org/lora", ModelRef(path="org/name", revision="main", adapter="org/lora")),
        ("./local@dir", ModelRef(path="./local@dir")),
        ({"path": "org/x", "revision": "abc"}, ModelRef(path="org/x", revision="abc")),
    ],
)
def test_model_references(text: object, expected: ModelRef) -> None:
    recipe = Recipe.model_validate({"merge_method": "linear", "models": [{"model": text}]})
    assert recipe.models is not None
    assert recipe.models[0].model == expected


def problems(text: str) -> list[str]:
    with pytest.raises(RecipeError) as info:
        parse_recipe(text)
    return [p.render() for p in info.value.problems]


BASE = "merge_method: linear\nmodels:\n  - model: a/b\n    parameters: {weight: 1}\n"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            BASE + "dtyp: bf16\n",
            "dtyp: unknown key `dtyp` in the top level; did you mean `dtype`?\n    hint: allowed keys: "
            "merge_method, base_model, models, slices, modules, parameters, dtype, out_dtype, "
            "tokenizer_source, tokenizer, chat_template, post, name, description, license, tags, seed, tensor_names, output",
        ),
        (
            "merge_method: linear\nmodels:\n  - model: a/b\n    parameters: {wieght: 1}\n",
            "models[0].parameters.wieght: unknown parameter `wieght` for method `linear`; "
            "did you mean `weight`?\n    hint: `linear` takes `weight`, `normalize` (see "
            "`mergecli methods linear`)",
        ),
        (
            "merge_method: linaer\nmodels:\n  - model: a/b\n",
            "merge_method: unknown merge method `linaer`\n    hint: did you mean `linear`? "
            "`mergecli methods` lists them: " + ", ".join(methods.names()),
        ),
        (
            BASE + "parameters: {normalize: 3}\n",
            "parameters.normalize: expected true or false, found 3\n    hint: divide by the sum of the weights",
        ),
        (
            "merge_method: linear\nmodels:\n  - model: a/b\n    parameters: {weight: 1, normalize: true}\n",
            "models[0].parameters.normalize: `normalize` is a method-wide parameter of `linear` and "
            "has no effect on one model\n    hint: move it to the top-level `parameters:` (or a "
            "slice's `parameters:`)",
        ),
        (
            "merge_method: linear\nmodels:\n  - model: a/b\n",
            "models[0].parameters: missing required parameter `weight` for model `a/b`\n    hint: set "
            "`weight` under this model's `parameters:` or once in the top-level `parameters:`",
        ),
        (
            "merge_method: linear\nmodels:\n  - modle: a/b\n",
            "models[0].modle: unknown key `modle` in models[0]; did you mean `model`?\n    hint: "
            "allowed keys: model, parameters",
        ),
        (
            BASE + "dtype: fp8\n",
            "dtype: unknown dtype 'fp8'; allowed: float32, float16, bfloat16, float64 (aliases fp32, "
            "fp16, bf16 and torch.* also work)",
        ),
        (
            "merge_method: linear\nmodels:\n  - model: a/b\n    parameters: {weight: [1, {value: 2}]}\n",
            "models[0].parameters.weight: a list must hold only numbers (a gradient) or only "
            "{filter, value} conditions",
        ),
        (
            "merge_method: linear\nmodels:\n  - model: a/b\n    parameters:\n      weight: [{filtre: x, value: 1}]\n",
            "models[0].parameters.weight: unknown key `filtre` in a filter condition; did you mean "
            "`filter`?; a condition has only `filter` and `value`",
        ),
        (
            "merge_method: passthrough\nslices:\n  - sources:\n    - model: a/b\n      layer_range: [4, 4]\n",
            "slices[0].sources[0].layer_range: layer_range [4, 4] is empty (the end is exclusive)\n"
            "    hint: to take layer 4 alone write [4, 5]",
        ),
        (
            "merge_method: passthrough\nslices:\n  - sources:\n    - model: a/b\n      layer_range: [0]\n",
            "slices[0].sources[0].layer_range: layer_range must be two integers [start, end) (end "
            "exclusive), e.g. [0, 16]",
        ),
        (
            BASE + "slices:\n  - sources:\n    - model: a/b\n      layer_range: [0, 1]\n",
            "give exactly one of `models`, `slices` or `modules` (found `models` and `slices`)",
        ),
        (
            "merge_method: linear\nmodels:\n  - model: a/b\n    parameters: {weight: 1}\n  - model: c/d\n    parameters: {weight: null}\n",
            "models[1].parameters.weight: expected a number, true/false, a string, a gradient list or "
            "filter conditions; found nothing (null)",
        ),
        (
            "merge_method: linear\nmodels:\n  - model: a/b\n    parameters: {weight: 1}\nseed: -1\n",
            "seed: Input should be greater than or equal to 0 (found -1)",
        ),
    ],
)
def test_each_mistake_has_a_pinned_message(text: str, expected: str) -> None:
    found = problems(text)
    assert expected in found, found


def test_slice_sources_of_different_lengths_name_both_ranges() -> None:
    found = problems(
        "merge_method: linear\nslices:\n  - sources:\n    - model: a/b\n      layer_range: [0, 4]\n"
        "      parameters: {weight: 1}\n    - model: c/d\n      layer_range: [0, 3]\n"
        "      parameters: {weight: 1}\n"
    )
    assert found == [
        "slices[0].sources[1].layer_range: covers 3 layers [0, 3] but sources[0] covers 4 [0, 4]\n"
        "    hint: all sources of one slice must cover the same number of layers"
    ]


def test_every_problem_is_reported_at_once() -> None:
    found = problems(
        "merge_method: linear\nmodels:\n  - model: a/b\n    parameters: {wieght: 1}\n"
        "  - modle: c/d\nparameters: {normalize: maybe}\ndtyp: bf16\n"
    )
    wheres = sorted(p.split(":")[0] for p in found)
    assert wheres == [
        "dtyp",
        "models[0].parameters.wieght",
        "models[1].model",
        "models[1].modle",
        "parameters.normalize",
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "the recipe is empty"),
        (
            "- a\n- b\n",
            "a recipe must be a mapping of keys (merge_method, models, ...); found a list",
        ),
        (
            "merge_method: linear\nmodels: [\n",
            "line 3, column 1: YAML syntax error: expected the node content, but found '<stream end>'",
        ),
        ("a: !!python/object/apply:os.system ['echo hi']\n", "could not determine a constructor"),
    ],
)
def test_unreadable_recipes(text: str, expected: str) -> None:
    assert any(expected in p for p in problems(text))


def test_unsupported_features_are_refused_not_ignored() -> None:
    text = (
        "merge_method: passthrough\nslices:\n  - sources:\n      - model: a/b\n"
        "        layer_range: [0, 2]\n    residual_weight: 0.5\n"
    )
    assert problems(text) == [
        "slices[0].residual_weight: `residual_weight` is not supported yet\n    hint: remove it"
    ]
