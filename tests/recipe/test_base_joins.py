"""A `models:` recipe's `base_model` is merged as one more model by methods that take no
base (#13: mergekit 0.1.5 appends it to the models, with the top-level parameters)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import invoke, write

NAME = "model.layers.1.self_attn.o_proj.weight"


def _run(tmp_path: Path, runner: CliRunner, text: str) -> tuple[int, str, dict[str, torch.Tensor]]:
    code, _, err = invoke(
        runner, "run", str(write(tmp_path / "r.yaml", text)), "-o", str(tmp_path / "out")
    )
    out = load_file(tmp_path / "out" / "model.safetensors") if code == 0 else {}
    return code, err, out


def _load(family: dict[str, Path], *names: str) -> list[torch.Tensor]:
    return [load_file(family[n] / "model.safetensors")[NAME].double() for n in names]


def test_linear_averages_the_base_with_the_top_level_weight(
    family: dict[str, Path], tmp_path: Path, runner: CliRunner
) -> None:
    text = (
        f"merge_method: linear\nbase_model: {family['base']}\ndtype: float32\n"
        f"parameters: {{weight: 1}}\nmodels:\n  - model: {family['a']}\n"
        f"  - model: {family['b']}\n    parameters: {{weight: 2}}\n"
    )
    code, err, out = _run(tmp_path, runner, text)
    assert code == 0, err
    base, a, b = _load(family, "base", "a", "b")
    torch.testing.assert_close(out[NAME].double(), (a + 2 * b + base) / 4, rtol=0, atol=1e-6)


def test_a_base_listed_among_the_models_is_merged_once(
    family: dict[str, Path], tmp_path: Path, runner: CliRunner
) -> None:
    text = (
        f"merge_method: linear\nbase_model: {family['base']}\ndtype: float32\nmodels:\n"
        f"  - model: {family['a']}\n    parameters: {{weight: 1}}\n"
        f"  - model: {family['base']}\n    parameters: {{weight: 3}}\n"
    )
    code, err, out = _run(tmp_path, runner, text)
    assert code == 0, err
    base, a = _load(family, "base", "a")
    torch.testing.assert_close(out[NAME].double(), (a + 3 * base) / 4, rtol=0, atol=1e-6)


def test_a_base_without_a_weight_is_refused_with_the_fix(
    family: dict[str, Path], tmp_path: Path, runner: CliRunner
) -> None:
    text = (
        f"merge_method: linear\nbase_model: {family['base']}\nmodels:\n"
        f"  - model: {family['a']}\n    parameters: {{weight: 1}}\n"
    )
    code, err, _ = _run(tmp_path, runner, text)
    assert code == 2, err
    assert (
        "base_model: `linear` merges the base_model as one more model (as mergekit does), "
        "and it has no `weight`" in err
    )
    assert "or remove `base_model` (`linear` does not need one)" in err
    assert not (tmp_path / "out").exists()


def test_slices_do_not_add_the_base(
    family: dict[str, Path], tmp_path: Path, runner: CliRunner
) -> None:
    text = (
        f"merge_method: linear\nbase_model: {family['base']}\ndtype: float32\n"
        f"parameters: {{weight: 1}}\nslices:\n  - sources:\n"
        f"      - {{model: {family['a']}, layer_range: [0, 3]}}\n"
        f"      - {{model: {family['b']}, layer_range: [0, 3]}}\n"
    )
    code, err, out = _run(tmp_path, runner, text)
    assert code == 0, err
    a, b = _load(family, "a", "b")
    torch.testing.assert_close(out[NAME].double(), (a + b) / 2, rtol=0, atol=1e-6)
