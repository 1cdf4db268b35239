"""Recipe forms mergekit 0.1.5 accepts that mergecli used to refuse (#13): per-model
`gamma`, `epsilon` and passthrough `scale`, YAML 1.1 number strings, numeric booleans."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import invoke, write
from mergecli.methods import reference as ref


def states(*folders: Path) -> list[dict[str, torch.Tensor]]:
    return [load_file(f / "model.safetensors") for f in folders]


def run(runner: CliRunner, tmp_path: Path, text: str) -> dict[str, torch.Tensor]:
    code, _, err = invoke(
        runner, "run", str(write(tmp_path / "r.yaml", text)), "-o", str(tmp_path / "out")
    )
    assert code == 0, err
    return load_file(tmp_path / "out" / "model.safetensors")


def test_gamma_per_model_is_applied_per_model(
    family: dict[str, Path], tmp_path: Path, runner: CliRunner
) -> None:
    text = (
        f"merge_method: breadcrumbs\nbase_model: {family['base']}\nmodels:\n"
        f"  - model: {family['a']}\n    parameters: {{weight: 0.6, density: 0.5, gamma: 0.1}}\n"
        f"  - model: {family['b']}\n    parameters: {{weight: 0.4, density: 0.7, gamma: 0.02}}\n"
    )
    merged = run(runner, tmp_path, text)
    base, a, b = states(family["base"], family["a"], family["b"])
    params = {"lambda": 1.0, "normalize": False}
    for name in ("model.layers.1.mlp.up_proj.weight", "model.embed_tokens.weight"):
        want = ref.breadcrumbs(
            base[name].double(),
            [a[name].double(), b[name].double()],
            [0.6, 0.4],
            [0.5, 0.7],
            [0.1, 0.02],
            params,
            elect=False,
        )
        torch.testing.assert_close(merged[name].double(), want, rtol=1e-5, atol=1e-6)


def test_epsilon_per_model_passes_validate_and_checks_each_model(
    family: dict[str, Path], tmp_path: Path, runner: CliRunner
) -> None:
    text = (
        f"merge_method: della\nbase_model: {family['base']}\nmodels:\n"
        f"  - model: {family['a']}\n    parameters: {{weight: 1, density: 0.5, epsilon: 0.1}}\n"
        f"  - model: {family['b']}\n    parameters: {{weight: 1, density: 0.2, epsilon: 0.3}}\n"
    )
    code, _, err = invoke(runner, "validate", str(write(tmp_path / "r.yaml", text)))
    assert code == 2
    assert (
        "models[1].parameters: density 0.2 with epsilon 0.3 gives keep probabilities [-0.1, 0.5]"
        in err
    )
    assert "models[0]" not in err
    fixed = text.replace("epsilon: 0.3", "epsilon: 0.15")
    assert invoke(runner, "validate", str(write(tmp_path / "r.yaml", fixed)))[0] == 0


def test_passthrough_scale_per_source(
    family: dict[str, Path], tmp_path: Path, runner: CliRunner
) -> None:
    text = (
        "merge_method: passthrough\nslices:\n"
        f"  - sources: [{{model: {family['a']}, layer_range: [0, 2], parameters: {{scale: 0.5}}}}]\n"
        f"  - sources: [{{model: {family['b']}, layer_range: [2, 3]}}]\n"
    )
    merged = run(runner, tmp_path, text)
    a, b = states(family["a"], family["b"])
    name = "model.layers.1.self_attn.q_proj.weight"
    torch.testing.assert_close(merged[name], a[name] * 0.5)
    assert torch.equal(
        merged["model.layers.2.mlp.up_proj.weight"], b["model.layers.2.mlp.up_proj.weight"]
    )


@pytest.mark.parametrize(
    ("written", "value"),
    [
        ("1e-1", 0.1),
        ("5E-1", 0.5),
        ("+2e-1", 0.2),
        ("[1e-1, 3e-1]", None),
        ("[{filter: mlp, value: 2e-1}, {value: 1e-1}]", None),
    ],
)
def test_yaml_1_1_number_strings_are_numbers(
    family: dict[str, Path], tmp_path: Path, runner: CliRunner, written: str, value: float | None
) -> None:
    text = (
        f"merge_method: ties\nbase_model: {family['base']}\nmodels:\n"
        f"  - model: {family['a']}\n    parameters: {{weight: 1, density: {written}}}\n"
    )
    code, out, err = invoke(runner, "plan", str(write(tmp_path / "r.yaml", text)), "--json")
    assert code == 0, err
    if value is not None:
        assert f'"density": {value}' in out


@pytest.mark.parametrize(
    ("written", "ok"), [("1.0", True), ("0", True), ("1", True), ("2", False), ("0.5", False)]
)
def test_numeric_booleans(
    family: dict[str, Path], tmp_path: Path, runner: CliRunner, written: str, ok: bool
) -> None:
    text = (
        f"merge_method: ties\nbase_model: {family['base']}\nparameters: {{normalize: {written}}}\n"
        f"models:\n  - model: {family['a']}\n    parameters: {{weight: 1, density: 0.5}}\n"
    )
    code, _, err = invoke(runner, "validate", str(write(tmp_path / "r.yaml", text)))
    assert (code == 0) == ok, err
    if not ok:
        assert f"expected true or false, found {written}" in err


def test_sce_accepts_int8_mask(family: dict[str, Path], tmp_path: Path, runner: CliRunner) -> None:
    text = (
        f"merge_method: sce\nbase_model: {family['base']}\nparameters: {{int8_mask: true}}\n"
        f"models:\n  - model: {family['a']}\n  - model: {family['b']}\n"
    )
    code, _, err = invoke(runner, "validate", str(write(tmp_path / "r.yaml", text)))
    assert code == 0, err
