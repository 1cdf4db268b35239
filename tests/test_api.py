"""The public Python API: the same plan, bytes and math as the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import invoke, write
from mergecli import api
from mergecli.errors import RecipeError, UsageError


def _digests(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _recipes(family: dict[str, Path]) -> dict[str, str]:
    base, a, b = family["base"], family["a"], family["b"]
    two = (
        f"  - model: {a}\n    parameters: {{weight: 0.6, density: 0.5}}\n"
        f"  - model: {b}\n    parameters: {{weight: 0.4, density: 0.7}}\n"
    )
    return {
        "ties": f"merge_method: ties\nbase_model: {base}\nmodels:\n{two}dtype: bfloat16\n",
        "dare_ties": f"merge_method: dare_ties\nbase_model: {base}\nseed: 3\nmodels:\n{two}",
        "slerp": f"merge_method: slerp\nbase_model: {a}\nparameters: {{t: [0, 0.3, 1]}}\n"
        f"models:\n  - model: {a}\n  - model: {b}\n",
        "stack": "merge_method: passthrough\nslices:\n"
        f"  - sources: [{{model: {a}, layer_range: [0, 2]}}]\n"
        f"  - sources: [{{model: {b}, layer_range: [1, 3]}}]\n",
        "linear": "merge_method: linear\nmodels:\n"
        f"  - model: {a}\n    parameters: {{weight: [{{filter: mlp, value: 2}}, {{value: 1}}]}}\n"
        f"  - model: {b}\n    parameters: {{weight: 1}}\n",
    }


def test_run_writes_what_the_cli_writes(
    family: dict[str, Path], tmp_path: Path, runner: CliRunner
) -> None:
    recipe = write(tmp_path / "r.yaml", _recipes(family)["ties"])
    result = api.run(api.load_recipe(recipe), tmp_path / "api", reproducible=True)
    code, _, err = invoke(runner, "run", str(recipe), "-o", str(tmp_path / "cli"), "--reproducible")
    assert code == 0, err
    assert result.out == tmp_path / "api" and result.tensors > 0
    assert _digests(tmp_path / "api") == _digests(tmp_path / "cli")


@pytest.mark.parametrize("name", ["ties", "dare_ties", "slerp", "stack", "linear"])
def test_merge_state_dicts_equals_the_cli_output(
    family: dict[str, Path], tmp_path: Path, runner: CliRunner, name: str
) -> None:
    text = _recipes(family)[name]
    recipe = write(tmp_path / "r.yaml", text)
    code, _, err = invoke(runner, "run", str(recipe), "-o", str(tmp_path / "out"))
    assert code == 0, err
    expected = load_file(tmp_path / "out" / "model.safetensors")
    models = {k: family[k] for k in ("base", "a", "b")}
    states = {str(path): load_file(path / "model.safetensors") for path in models.values()}
    configs = {str(p): json.loads((p / "config.json").read_text()) for p in models.values()}
    merged = api.merge_state_dicts(text, states, configs=configs)
    assert list(merged) == list(expected)
    for key, tensor in expected.items():
        assert merged[key].dtype == tensor.dtype and torch.equal(merged[key], tensor), key


def test_merge_state_dicts_reads_and_writes_no_file(
    family: dict[str, Path], chdir_tmp: Path
) -> None:
    a = load_file(family["a"] / "model.safetensors")
    b = load_file(family["b"] / "model.safetensors")
    text = (
        "merge_method: linear\nmodels:\n  - model: x\n    parameters: {weight: 1}\n"
        "  - model: org/y@v1\n    parameters: {weight: 3}\n"
    )
    merged = api.merge_state_dicts(text, {"x": a, "org/y@v1": b})
    for key, tensor in a.items():
        torch.testing.assert_close(merged[key], (tensor + 3 * b[key]) / 4, rtol=1e-6, atol=1e-7)
        assert merged[key].data_ptr() != tensor.data_ptr()
    assert list(chdir_tmp.iterdir()) == []


def test_merge_state_dicts_names_a_missing_model() -> None:
    text = (
        "merge_method: linear\nmodels:\n  - model: x\n    parameters: {weight: 1}\n"
        "  - model: y\n    parameters: {weight: 1}\n"
    )
    with pytest.raises(UsageError, match="no state dict for y") as caught:
        api.merge_state_dicts(text, {"x": {"w": torch.ones(2)}})
    assert caught.value.hint == "give one per model of the recipe, keyed as written there: x, y"


def test_validate_lists_problems_and_plan_raises_them(family: dict[str, Path]) -> None:
    recipe = api.parse_recipe(
        f"merge_method: ties\nbase_model: {family['base']}\nmodels:\n"
        f"  - model: {family['a']}\n    parameters: {{weight: 1}}\n"
        f"  - model: {family['deep']}\n    parameters: {{weight: 1}}\n"
    )
    problems = api.validate(recipe)
    assert [p.where for p in problems] == ["models[1]"]
    assert "tensors that" in problems[0].message and problems[0].code == 4
    with pytest.raises(RecipeError) as caught:
        api.plan(recipe)
    assert caught.value.problems == tuple(problems)
    good = api.parse_recipe(
        f"merge_method: linear\nmodels:\n  - model: {family['a']}\n    parameters: {{weight: 1}}\n"
    )
    assert api.validate(good) == []
    names = api.plan(good, shard_size="1KB").shard_names
    assert len(names) > 1 and names[0] == f"model-00001-of-{len(names):05d}.safetensors"


def test_parse_recipe_finds_relative_models_in_its_folder(
    family: dict[str, Path], chdir_tmp: Path
) -> None:
    folder = family["a"].parent
    recipe = api.parse_recipe(
        "merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: 1}\n", folder
    )
    assert api.plan(recipe).models[0].source.root == folder / "a"  # type: ignore[attr-defined]
