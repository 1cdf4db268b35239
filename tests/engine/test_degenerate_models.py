"""Whole runs over models holding zero-size tensors and scalars, and copies holding NaN."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from conftest import invoke, write

EXTRA = {
    "model.layers.0.empty_rows": (0, 8),
    "model.layers.0.empty_cols": (8, 0),
    "model.layers.1.scalar": (),
    "model.nothing": (0,),
}


def with_extras(source: Path, dest: Path, seed: int) -> Path:
    shutil.copytree(source, dest)
    tensors = load_file(dest / "model.safetensors")
    g = torch.Generator().manual_seed(seed)
    for name, shape in EXTRA.items():
        tensors[name] = torch.randn(shape, generator=g)
    save_file(tensors, str(dest / "model.safetensors"), metadata={"format": "pt"})
    return dest


@pytest.fixture(scope="module")
def odd(family: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("odd")
    return {k: with_extras(family[k], root / k, i) for i, k in enumerate(("base", "a", "b"))}


RECIPES = {
    "linear": "merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 1}}\n  - model: {b}\n    parameters: {{weight: 1}}\n",
    "ties": "merge_method: ties\nbase_model: {base}\nmodels:\n  - model: {a}\n    parameters: {{weight: 1, density: 0.5}}\n  - model: {b}\n    parameters: {{weight: 1, density: 0.5}}\n",
    "dare_ties": "merge_method: dare_ties\nbase_model: {base}\nmodels:\n  - model: {a}\n    parameters: {{weight: 1, density: 0.5}}\n  - model: {b}\n    parameters: {{weight: 1, density: 0.5}}\n",
    "slerp": "merge_method: slerp\nbase_model: {a}\nparameters: {{t: 0.3}}\nmodels:\n  - model: {a}\n  - model: {b}\n",
    "della": "merge_method: della\nbase_model: {base}\nmodels:\n  - model: {a}\n    parameters: {{weight: 1, density: 0.5}}\n  - model: {b}\n    parameters: {{weight: 1, density: 0.5}}\n",
    "passthrough": "merge_method: passthrough\nslices:\n  - sources: [{{model: {a}, layer_range: [0, 2]}}]\n  - sources: [{{model: {b}, layer_range: [1, 3]}}]\n",
}


@pytest.mark.parametrize("method", sorted(RECIPES))
def test_zero_size_tensors_and_scalars_are_merged(
    odd: dict[str, Path], tmp_path: Path, runner: CliRunner, method: str
) -> None:
    recipe = write(tmp_path / "r.yaml", RECIPES[method].format(**odd))
    code, _, err = invoke(runner, "run", str(recipe), "-o", str(tmp_path / "out"))
    assert code == 0, err
    merged = load_file(tmp_path / "out" / "model.safetensors")
    for name, shape in EXTRA.items():
        if name in merged:
            assert tuple(merged[name].shape) == shape
    assert merged["model.nothing"].shape == (0,)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_nan_in_a_copied_layer_is_refused(
    family: dict[str, Path], tmp_path: Path, runner: CliRunner, value: float
) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(family["b"], bad)
    tensors = load_file(bad / "model.safetensors")
    tensors["model.layers.2.mlp.up_proj.weight"][3, 4] = value
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    text = RECIPES["passthrough"].format(a=family["a"], b=bad)
    code, _, err = invoke(
        runner, "run", str(write(tmp_path / "r.yaml", text)), "-o", str(tmp_path / "out")
    )
    assert code == 4, err
    assert f"tensor `model.layers.2.mlp.up_proj.weight` of {bad} holds 1 NaN/Inf values" in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
