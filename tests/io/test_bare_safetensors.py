"""Inputs without a config.json (#13): a `.safetensors` file, or a folder of them, is a
model whose tensors are merged name for name (mergekit-pytorch's job)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from conftest import invoke, run_subprocess, write


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


def _files(root: Path) -> dict[str, dict[str, torch.Tensor]]:
    """x, y, z: tensors that overlap in part (y lacks x's `a.weight` and `layers.1.w`)."""
    g = torch.Generator().manual_seed(5)
    names = {
        "x": ["a.weight", "shared.weight", "layers.0.w", "layers.1.w"],
        "y": ["b.weight", "shared.weight", "layers.0.w"],
        "z": ["a.weight", "b.weight", "shared.weight", "layers.0.w", "layers.1.w"],
    }
    out = {}
    for model, held in names.items():
        out[model] = {n: torch.randn(4, 3, generator=g) for n in held}
        save_file(out[model], str(root / f"{model}.safetensors"))
    return out


def _recipe(root: Path, mode: str, method: str = "linear", base: str = "") -> Path:
    text = f"merge_method: {method}\n{base}tensor_names: {mode}\nmodels:\n"
    for model, weight in (("x", 0.3), ("y", 0.7), ("z", 0.5)):
        text += f"  - model: {root / model}.safetensors\n    parameters: {{weight: {weight}}}\n"
    return write(root / "r.yaml", text)


def test_tensor_names_intersection_and_union(tmp_path: Path, runner: CliRunner) -> None:
    tensors = _files(tmp_path)
    weights = {"x": 0.3, "y": 0.7, "z": 0.5}
    for mode, expected in (
        ("intersection", ["layers.0.w", "shared.weight"]),
        ("union", ["a.weight", "b.weight", "layers.0.w", "layers.1.w", "shared.weight"]),
    ):
        out = tmp_path / f"out-{mode}"
        code, _, err = invoke(runner, "run", str(_recipe(tmp_path, mode)), "-o", str(out))
        assert code == 0, err
        merged = load_file(out / "model.safetensors")
        assert sorted(merged) == expected
        for name, value in merged.items():
            held = [m for m in weights if name in tensors[m]]
            total = sum(weights[m] for m in held)
            want = sum(weights[m] * tensors[m][name].double() for m in held) / total
            torch.testing.assert_close(value.double(), want, rtol=1e-6, atol=1e-7)


def test_tensor_names_all_names_the_way_out(tmp_path: Path, runner: CliRunner) -> None:
    _files(tmp_path)
    code, _, err = invoke(runner, "validate", str(_recipe(tmp_path, "all")))
    assert code == 4, err
    assert "or merge name for name with `tensor_names: intersection` (or `union`)" in " ".join(
        err.split()
    )


def test_union_refuses_what_it_cannot_merge(tmp_path: Path, runner: CliRunner) -> None:
    _files(tmp_path)
    base = f"base_model: {tmp_path / 'y'}.safetensors\n"
    code, _, err = invoke(
        runner, "validate", str(_recipe(tmp_path, "union", "task_arithmetic", base))
    )
    assert code == 4, err
    flat = " ".join(err.split())
    assert "tensor_names: tensor `a.weight` is in some models but not in the base" in flat
    assert "use `tensor_names: intersection`" in flat
    text = (
        f"merge_method: slerp\nbase_model: {tmp_path / 'x'}.safetensors\ntensor_names: union\n"
        f"parameters: {{t: 0.5}}\nmodels:\n  - model: {tmp_path / 'x'}.safetensors\n"
        f"  - model: {tmp_path / 'z'}.safetensors\n"
    )
    code, _, err = invoke(runner, "validate", str(write(tmp_path / "s.yaml", text)))
    assert code == 4, err
    assert "tensor `b.weight` is in some models but not in the base" in " ".join(err.split())


def test_tensor_names_belongs_to_the_models_form(tmp_path: Path, runner: CliRunner) -> None:
    text = (
        "merge_method: passthrough\ntensor_names: union\nslices:\n"
        "  - sources:\n      - model: a\n        layer_range: [0, 1]\n"
    )
    code, _, err = invoke(runner, "validate", str(write(tmp_path / "r.yaml", text)))
    assert code == 2, err
    assert "`tensor_names: union` applies to the `models:` form (merged name for name)" in err


def test_a_gguf_path_is_local_and_a_truncated_one_is_refused(
    tmp_path: Path, runner: CliRunner
) -> None:
    (tmp_path / "m.gguf").write_bytes(b"GGUF\x03\x00\x00\x00")
    bare(tmp_path, "a.safetensors", 1)
    text = (
        f"merge_method: linear\nparameters: {{weight: 1}}\nmodels:\n"
        f"  - model: {tmp_path / 'm.gguf'}\n  - model: {tmp_path / 'a.safetensors'}\n"
    )
    code, _, err = invoke(runner, "validate", str(write(tmp_path / "r.yaml", text)))
    assert code == 3, err
    assert "m.gguf is not a readable GGUF file" in err
    text = "merge_method: linear\nparameters: {weight: 1}\nmodels:\n  - model: gone.gguf\n"
    code, _, err = invoke(runner, "validate", str(write(tmp_path / "g.yaml", text)))
    assert code == 3, err
    assert "gone.gguf: local folder not found" in err


def test_an_unreachable_hub_is_exit_3_not_an_internal_error(tmp_path: Path) -> None:
    text = "merge_method: linear\nparameters: {weight: 1}\nmodels:\n  - model: org/model\n"
    result = run_subprocess(
        "validate",
        str(write(tmp_path / "r.yaml", text)),
        HF_HUB_OFFLINE="0",
        HF_ENDPOINT="http://127.0.0.1:9",
        HF_HUB_ETAG_TIMEOUT="2",
    )
    assert result.returncode == 3, result.stderr
    assert "models[0].model: org/model:" in result.stderr
    assert "cannot reach the Hub: check the network, or set HF_HUB_OFFLINE=1" in result.stderr
    assert "internal error" not in result.stderr
