"""Inputs without a config.json (#13): a `.safetensors` file, or a folder of them, is a
model whose tensors are merged name for name (mergekit-pytorch's job)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from conftest import invoke, write


def bare(tmp_path: Path, name: str, seed: int) -> Path:
    g = torch.Generator().manual_seed(seed)
    tensors = {"encoder.w": torch.randn(8, 4, generator=g), "head.b": torch.randn(3, generator=g)}
    path = tmp_path / name
    save_file(tensors, str(path))
    return path


def test_safetensors_files_are_models(tmp_path: Path, runner: CliRunner, chdir_tmp: Path) -> None:
    a, b = bare(chdir_tmp, "a.safetensors", 1), bare(chdir_tmp, "b.safetensors", 2)
    recipe = write(
        chdir_tmp / "r.yaml",
        "merge_method: linear\nmodels:\n  - model: a.safetensors\n    parameters: {weight: 1}\n"
        "  - model: ./b.safetensors\n    parameters: {weight: 3}\n",
    )
    code, _, err = invoke(runner, "run", str(recipe), "-o", "out")  # beside the inputs
    assert code == 0, err
    merged, ta, tb = (load_file(p) for p in (chdir_tmp / "out" / "model.safetensors", a, b))
    for name in ta:
        torch.testing.assert_close(merged[name], (ta[name] + 3 * tb[name]) / 4)
    config = json.loads((chdir_tmp / "out" / "config.json").read_text())
    assert config == {"torch_dtype": "float32"}


def test_a_folder_without_config_is_a_model(
    family: dict[str, Path], tmp_path: Path, runner: CliRunner
) -> None:
    folders = []
    for name in ("a", "b"):
        folder = tmp_path / f"bare-{name}"
        folder.mkdir()
        shutil.copy(family[name] / "model.safetensors", folder / "model.safetensors")
        folders.append(folder)
    recipe = write(
        tmp_path / "r.yaml",
        "merge_method: linear\nmodels:\n"
        + "".join(f"  - model: {f}\n    parameters: {{weight: 1}}\n" for f in folders),
    )
    code, _, err = invoke(runner, "run", str(recipe), "-o", str(tmp_path / "out"))
    assert code == 0, err
    merged = load_file(tmp_path / "out" / "model.safetensors")
    ta, tb = (load_file(f / "model.safetensors") for f in folders)
    name = "model.layers.1.mlp.up_proj.weight"
    torch.testing.assert_close(merged[name], (ta[name] + tb[name]) / 2)


def test_a_missing_safetensors_file_is_not_taken_for_a_hub_id(
    tmp_path: Path, runner: CliRunner
) -> None:
    recipe = write(
        tmp_path / "r.yaml",
        "merge_method: linear\nmodels:\n  - model: nope.safetensors\n    parameters: {weight: 1}\n",
    )
    code, _, err = invoke(runner, "validate", str(recipe))
    assert code == 3, err
    assert "nope.safetensors: local folder not found" in err
