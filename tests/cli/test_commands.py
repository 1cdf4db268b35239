"""Commands other than `run`'s merge path: methods, recipes, version, dry-run, help, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from conftest import invoke, write
from mergecli import __version__, methods

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def test_version(runner: CliRunner) -> None:
    assert invoke(runner, "--version")[:2] == (0, f"mergecli {__version__}\n")


def test_methods_table_and_json(runner: CliRunner) -> None:
    code, out, _ = invoke(runner, "methods", "--json")
    assert code == 0
    data = json.loads(out)
    assert [m["name"] for m in data] == methods.names()
    linear = next(m for m in data if m["name"] == "linear")
    assert linear["parameters"][0] == {
        "name": "weight",
        "type": "float",
        "scope": "per model",
        "required": True,
        "default": None,
        "allowed": "a number",
        "description": "relative weight of this model",
    }
    assert linear["paper"] == "https://arxiv.org/abs/2203.05482" and linear["data"] == "data-free"
    code, out, _ = invoke(runner, "methods")
    assert code == 0 and "weight (required), normalize (true)" in out


def test_one_method_and_an_unknown_one(runner: CliRunner) -> None:
    code, out, _ = invoke(runner, "methods", "passthrough")
    assert code == 0 and "passthrough" in out and "scale" in out
    code, _, err = invoke(runner, "methods", "lineer")
    assert code == 2
    assert "unknown method `lineer`; did you mean `linear`?" in err


def test_recipes_list_show_cp(runner: CliRunner, tmp_path: Path) -> None:
    code, out, _ = invoke(runner, "recipes", "list")
    assert code == 0
    for path in RECIPES.glob("*.yaml"):
        assert path.stem in out
    code, out, _ = invoke(runner, "recipes", "show", "quickstart")
    assert code == 0 and out == (RECIPES / "quickstart.yaml").read_text()
    code, out, _ = invoke(runner, "recipes", "cp", "quickstart", str(tmp_path))
    assert code == 0
    copied = yaml.safe_load((tmp_path / "quickstart.yaml").read_text())
    assert copied["models"][0]["model"] == str((RECIPES / "models" / "tiny-llama-chat").resolve())
    code, _, err = invoke(runner, "recipes", "cp", "quickstart", str(tmp_path))
    assert code == 5 and "already exists" in err
    code, _, err = invoke(runner, "recipes", "show", "quikstart")
    assert code == 3 and "did you mean `quickstart`?" in err


def test_copied_recipe_runs_from_anywhere(
    runner: CliRunner, tmp_path: Path, chdir_tmp: Path
) -> None:
    assert invoke(runner, "recipes", "cp", "frankenmerge", "mine.yaml")[0] == 0
    code, _, err = invoke(runner, "run", "mine.yaml", "-o", "out", "--quiet")
    assert code == 0, err
    assert json.loads((chdir_tmp / "out" / "config.json").read_text())["num_hidden_layers"] == 6


def test_dry_run_writes_nothing(runner: CliRunner, tmp_path: Path) -> None:
    code, _, err = invoke(
        runner, "run", str(RECIPES / "quickstart.yaml"), "-o", str(tmp_path / "out"), "--dry-run"
    )
    assert code == 0
    assert "dry run: 39 tensors" in err
    assert not (tmp_path / "out").exists()


def test_bad_shard_size_is_a_usage_error(runner: CliRunner, tmp_path: Path) -> None:
    code, _, err = invoke(
        runner,
        "run",
        str(RECIPES / "quickstart.yaml"),
        "-o",
        str(tmp_path / "o"),
        "--shard-size",
        "5XB",
    )
    assert code == 2
    assert "--shard-size: cannot read '5XB' as a size" in err


def test_recipe_errors_exit_2_without_traceback(runner: CliRunner, tmp_path: Path) -> None:
    recipe = write(
        tmp_path / "r.yaml",
        "merge_method: linear\nmodels:\n  - model: a/b\n    parameters: {wieght: 1}\n",
    )
    code, out, err = invoke(runner, "run", str(recipe), "-o", str(tmp_path / "o"))
    assert code == 2 and out == ""
    assert f"error: invalid recipe in {recipe}: 3 problems" in err  # the model's own too
    assert "models[0].model: a/b: not in the local cache" in err
    assert "Traceback" not in err
    code, _, err = invoke(runner, "validate", str(tmp_path))
    assert code == 2 and "is a directory, not a recipe file" in err


def test_every_command_has_help_with_examples(runner: CliRunner) -> None:
    for command in (
        ["run"],
        ["validate"],
        ["plan"],
        ["methods"],
        ["recipes", "cp"],
        ["recipes", "show"],
    ):
        code, out, _ = invoke(runner, *command, "--help")
        assert code == 0 and "mergecli " in out, command


def test_plan_table(runner: CliRunner) -> None:
    code, out, _ = invoke(runner, "plan", str(RECIPES / "frankenmerge.yaml"))
    assert code == 0
    assert "model.layers.5.mlp.up_proj.weight" in out
    assert "predicted peak memory" in out
    assert "layers: 4 in the base/first model -> 6 in the output" in out


def test_exit_codes_of_the_console_entry_point(capsys: pytest.CaptureFixture[str]) -> None:
    from mergecli.cli import _exit_code

    assert (_exit_code(None), _exit_code(0), _exit_code(5)) == (0, 0, 5)
    assert _exit_code("cannot go on") == 1
    assert capsys.readouterr().err == "cannot go on\n"
