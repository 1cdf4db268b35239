"""Hostile recipe text: alias bombs, deep nesting, duplicate keys, NaN and infinities,
absurd option values. Each case pins the exit code and the message, and runs fast."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import invoke, write

LAUGHS = "\n".join(
    ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
)


BOMBS = {
    "name": f"{LAUGHS}\nname: *a8\nmerge_method: linear\nmodels:\n  - model: a/b\n    parameters: {{weight: 1}}\n",
    "tags": f"{LAUGHS}\ntags: *a8\nmerge_method: linear\nmodels:\n  - model: a/b\n    parameters: {{weight: 1}}\n",
    "parameter": f"{LAUGHS}\nmerge_method: linear\nmodels:\n  - model: a/b\n    parameters: {{weight: *a8}}\n",
    "models": f"{LAUGHS}\nmerge_method: linear\nmodels: *a8\n",
}


@pytest.mark.parametrize("where", sorted(BOMBS))
def test_alias_bombs_are_refused_at_once(tmp_path: Path, runner: CliRunner, where: str) -> None:
    recipe = write(tmp_path / "r.yaml", BOMBS[where])
    assert recipe.stat().st_size < 1000
    started = time.monotonic()
    code, _, err = invoke(runner, "validate", str(recipe))
    assert time.monotonic() - started < 5
    assert code == 2
    assert "the recipe expands to more than 100000 values (YAML aliases?)" in err


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("models: " + "[" * 5000 + "]" * 5000, "nested deeper than 64 levels"),
        ("models: " + "{a: " * 200 + "1" + "}" * 200, "nested deeper than 64 levels"),
        ("a:\n" + "".join("  " * i + "- \n" for i in range(1, 80)), "nested deeper than 64 levels"),
        ("merge_method: linear\nmerge_method: ties\n", "key `merge_method` is given twice"),
        (
            "merge_method: linear\nmodels:\n  - model: a/b\n    model: c/d\n",
            "key `model` is given twice",
        ),
        (
            "merge_method: linear\nmodels:\n  - model: a/b\n    parameters: {weight: 1, weight: 2}\n",
            "key `weight` is given twice",
        ),
        ("merge_method: linear\ndtype: float16\ndtype: bfloat16\n", "key `dtype` is given twice"),
        ("x: &a 1\ny: *b\n", "found undefined alias"),
    ],
    ids=[
        "brackets",
        "braces",
        "block-lists",
        "top-key",
        "model-key",
        "param-key",
        "dtype",
        "alias",
    ],
)
def test_hostile_yaml_structure(tmp_path: Path, runner: CliRunner, text: str, message: str) -> None:
    code, _, err = invoke(runner, "validate", str(write(tmp_path / "r.yaml", text)))
    assert code == 2, err
    assert message in err
    assert "Traceback" not in err and "RecursionError" not in err


BASE = "merge_method: {method}\nbase_model: a/base\nmodels:\n  - model: a/b\n    parameters: {{{params}}}\n"
NUMBERS = [
    ("linear", "weight: .nan", "models[0].parameters.weight"),
    ("linear", "weight: .inf", "models[0].parameters.weight"),
    ("linear", "weight: -.inf", "models[0].parameters.weight"),
    ("linear", "weight: [0, .nan, 1]", "models[0].parameters.weight"),
    ("linear", "weight: [{filter: mlp, value: .nan}, {value: 1}]", "models[0].parameters.weight"),
    (
        "linear",
        "weight: [{filter: mlp, value: [0, .inf]}, {value: 1}]",
        "models[0].parameters.weight",
    ),
    ("ties", "weight: 1, density: .nan", "models[0].parameters.density"),
    ("ties", "weight: 1, density: .inf", "models[0].parameters.density"),
    ("dare_ties", "weight: 1, density: -.inf", "models[0].parameters.density"),
    ("slerp", "t: .nan", "models[0].parameters.t"),
    ("della", "weight: 1, density: 0.5, epsilon: .nan", "models[0].parameters.epsilon"),
    ("breadcrumbs", "weight: 1, gamma: .inf", "models[0].parameters.gamma"),
    ("task_arithmetic", "weight: 1, lambda: .nan", "models[0].parameters.lambda"),
]


@pytest.mark.parametrize(("method", "params", "where"), NUMBERS)
def test_nan_and_infinities_are_refused_at_validate(
    tmp_path: Path, runner: CliRunner, method: str, params: str, where: str
) -> None:
    text = BASE.format(method=method, params=params)
    code, _, err = invoke(runner, "validate", str(write(tmp_path / "r.yaml", text)))
    assert code == 2, err
    assert "is not a finite number" in err
    assert where.split(".")[0] in err


@pytest.mark.parametrize(
    "top", ["parameters: {t: .nan}", "parameters: {normalize: true, lambda: .inf}"]
)
def test_nan_in_top_level_parameters(tmp_path: Path, runner: CliRunner, top: str) -> None:
    text = (
        "merge_method: task_arithmetic\nbase_model: a/base\nmodels:\n  - model: a/b\n    parameters: {weight: 1}\n"
        + top
        + "\n"
    )
    code, _, err = invoke(runner, "validate", str(write(tmp_path / "r.yaml", text)))
    assert code == 2 and "is not a finite number" in err, err


@pytest.mark.parametrize("alpha", [".nan", ".inf"])
def test_nan_in_post_steps(tmp_path: Path, runner: CliRunner, alpha: str) -> None:
    text = (
        "merge_method: task_arithmetic\nbase_model: a/base\nmodels:\n  - model: a/b\n"
        f"    parameters: {{weight: 1}}\npost:\n  lines: {{alpha: {alpha}, beta: 0.5}}\n"
    )
    code, _, err = invoke(runner, "validate", str(write(tmp_path / "r.yaml", text)))
    assert code == 2, err
    assert "post.lines.alpha" in err and "finite number" in err


@pytest.mark.parametrize(
    ("size", "message"),
    [
        ("0", "--shard-size"),
        ("-5GB", "--shard-size"),
        ("1e400GB", "--shard-size"),
        ("lots", "--shard-size"),
        ("5XB", "--shard-size"),
    ],
)
def test_absurd_shard_sizes_are_usage_errors(
    family: dict[str, Path], tmp_path: Path, runner: CliRunner, size: str, message: str
) -> None:
    recipe = write(
        tmp_path / "r.yaml",
        f"merge_method: linear\nmodels:\n  - model: {family['a']}\n    parameters: {{weight: 1}}\n",
    )
    code, _, err = invoke(
        runner, "run", str(recipe), "-o", str(tmp_path / "o"), "--shard-size", size
    )
    assert code == 2, err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


@pytest.mark.parametrize(
    "name",
    ["a/\x1b[31mred", "models/\x07bell", "x\rcarriage", "evil\x1b]0;title\x07"],
    ids=["ansi", "bell", "cr", "osc"],
)
def test_control_characters_of_model_names_are_not_echoed(
    tmp_path: Path, runner: CliRunner, name: str
) -> None:
    text = f'merge_method: linear\nmodels:\n  - model: "{name.encode("unicode_escape").decode()}"\n    parameters: {{weight: 1}}\n'
    code, out, err = invoke(runner, "validate", str(write(tmp_path / "r.yaml", text)))
    assert code in (2, 3), err
    assert not any(c in err + out for c in "\x1b\x07\r")


@pytest.mark.parametrize(
    ("folder", "message"),
    [
        (".", "must be a relative folder inside the output"),
        ("''", "must be a relative folder inside the output"),
        ("/tmp/x", "must be a relative folder inside the output"),
        ("a/../../x", "must be a relative folder inside the output"),
        ("config.json", "would collide with the output's own files"),
        ("model.safetensors", "would collide with the output's own files"),
        ("README.md", "would collide with the output's own files"),
        ("mergecli_recipe", "would collide with the output's own files"),
        ("tokenizer.json", "would collide with the output's own files"),
    ],
)
def test_save_masks_folders_that_collide_or_escape(
    family: dict[str, Path], tmp_path: Path, runner: CliRunner, folder: str, message: str
) -> None:
    text = (
        f"merge_method: consensus\nbase_model: {family['base']}\n"
        f"parameters: {{k: 1, save_masks: {folder}}}\nmodels:\n"
        f"  - model: {family['a']}\n    parameters: {{lambda: 0.5}}\n"
        f"  - model: {family['b']}\n    parameters: {{lambda: 0.5}}\n"
    )
    code, _, err = invoke(
        runner, "run", str(write(tmp_path / "r.yaml", text)), "-o", str(tmp_path / "o")
    )
    assert code == 2, err
    assert message in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "mistake",
    ["modles: []\n", "dtype: fp8\n", "parameters: {wieght: 1}\n", "merge_method: linaer\n"],
    ids=["unknown-key", "bad-dtype", "misplaced-param", "unknown-method"],
)
def test_recipe_problems_do_not_hide_model_problems(
    family: dict[str, Path], tmp_path: Path, runner: CliRunner, mistake: str
) -> None:
    text = (
        "merge_method: linear\n"
        f"models:\n  - model: {tmp_path / 'missing'}\n    parameters: {{weight: 1}}\n"
        f"  - model: {family['a']}\n    parameters: {{weight: 1}}\n"
    )
    lines = [
        line
        for line in text.splitlines(keepends=True)
        if not line.startswith(mistake.split(":")[0] + ":")
    ]
    code, _, err = invoke(
        runner, "validate", str(write(tmp_path / "r.yaml", "".join(lines) + mistake))
    )
    assert code == 2, err
    assert f"models[0].model: {tmp_path / 'missing'}: local folder not found" in err
    assert "models[1]" not in err  # the good model has no problem
