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


NOOP_CASES = [
    (
        "linear",
        "parameters: {weight: 1, density: 1.0}",
        "parameters.density: `linear` takes no `density` (`linear` keeps every entry; "
        "density 1 restates that); ignored, as mergekit ignores it",
    ),
    (
        "linear",
        "parameters: {weight: 1, int8_mask: true}",
        "parameters.int8_mask: `linear` takes no `int8_mask` (a memory option of mergekit's; "
        "mergecli's selection is exact without it); ignored, as mergekit ignores it",
    ),
    (
        "slerp",
        "parameters: {t: 0.3, lambda: 1}",
        "parameters.lambda: `slerp` takes no `lambda` (`slerp` does not scale its result; "
        "lambda 1 restates that)",
    ),
    (
        "multislerp",
        "parameters: {weight: 1, normalize: true}",
        "parameters.normalize: `multislerp` takes no `normalize` (`multislerp` always "
        "normalizes its weights)",
    ),
    (
        "karcher",
        "parameters: {weight: 1.0}",
        "parameters.weight: `karcher` takes no `weight` (`karcher` treats its models alike; "
        "equal weights restate that)",
    ),
]


def _noop_recipe(family: dict[str, Path], method: str, params: str) -> str:
    base = f"base_model: {family['a']}\n" if method == "slerp" else ""
    return (
        f"merge_method: {method}\n{base}{params}\n"
        f"models:\n  - model: {family['a']}\n  - model: {family['b']}\n"
    )


@pytest.mark.parametrize(("method", "params", "warning"), NOOP_CASES)
def test_keys_that_change_nothing_are_warnings_and_strict_refuses_them(
    family: dict[str, Path],
    tmp_path: Path,
    runner: CliRunner,
    method: str,
    params: str,
    warning: str,
) -> None:
    recipe = write(tmp_path / "r.yaml", _noop_recipe(family, method, params))
    code, _, err = invoke(runner, "validate", str(recipe))
    assert code == 0, err
    assert warning in " ".join(err.split())
    assert "hint: remove it (`--strict` refuses keys that change nothing)" in err
    for command in (["validate"], ["plan"], ["run", "-o", str(tmp_path / "out")]):
        code, _, err = invoke(runner, *command, "--strict", str(recipe))
        assert code == 2, (command, err)
        assert "refused by --strict; mergekit ignores it" in " ".join(err.split())
    assert not (tmp_path / "out").exists()


def test_a_warned_key_leaves_the_output_as_without_it(
    family: dict[str, Path], tmp_path: Path, runner: CliRunner
) -> None:
    outputs = []
    for i, params in enumerate(
        ["parameters: {weight: 1.0}", "parameters: {weight: 1.0, density: 1, lambda: 1.0}"]
    ):
        recipe = write(tmp_path / f"r{i}.yaml", _noop_recipe(family, "linear", params))
        code, _, err = invoke(runner, "run", str(recipe), "-o", str(tmp_path / f"o{i}"))
        assert code == 0, err
        outputs.append((tmp_path / f"o{i}" / "model.safetensors").read_bytes())
    assert outputs[0] == outputs[1]


@pytest.mark.parametrize(
    ("method", "params", "error"),
    [
        ("linear", "parameters: {weight: 1, density: 0.5}", "unknown parameter `density`"),
        (
            "multislerp",
            "parameters: {weight: 1, normalize: false}",
            "unknown parameter `normalize`",
        ),
        ("slerp", "parameters: {t: 0.3, lambda: 0.5}", "unknown parameter `lambda`"),
        ("linear", "parameters: {weight: 1, int8_mask: 3}", "unknown parameter `int8_mask`"),
    ],
)
def test_keys_whose_intent_would_be_lost_stay_errors(
    family: dict[str, Path],
    tmp_path: Path,
    runner: CliRunner,
    method: str,
    params: str,
    error: str,
) -> None:
    recipe = write(tmp_path / "r.yaml", _noop_recipe(family, method, params))
    code, _, err = invoke(runner, "validate", str(recipe))
    assert code == 2, err
    assert error in err
    assert "warning:" not in err


def test_unequal_weights_on_a_method_without_weights_stay_errors(
    family: dict[str, Path], tmp_path: Path, runner: CliRunner
) -> None:
    text = (
        "merge_method: karcher\nmodels:\n"
        f"  - model: {family['a']}\n    parameters: {{weight: 0.7}}\n"
        f"  - model: {family['b']}\n    parameters: {{weight: 0.3}}\n"
    )
    code, _, err = invoke(runner, "validate", str(write(tmp_path / "r.yaml", text)))
    assert code == 2, err
    flat = " ".join(err.split())
    assert "models[0].parameters.weight: unknown parameter `weight` for method `karcher`" in flat
    assert "models[1].parameters.weight: unknown parameter `weight`" in flat
