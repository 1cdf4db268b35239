"""Bad inputs through the CLI: exit code and message pinned for each (see tests/README.md)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from conftest import invoke, write


def copy_model(family: dict[str, Path], name: str, dest: Path) -> Path:
    shutil.copytree(family[name], dest)
    return dest


def linear_of(*folders: Path) -> str:
    return "merge_method: linear\nmodels:\n" + "".join(
        f"  - model: {f}\n    parameters: {{weight: 1}}\n" for f in folders
    )


def test_different_architectures(
    family: dict[str, Path], tmp_path: Path, runner: CliRunner
) -> None:
    other = copy_model(family, "b", tmp_path / "mistralish")
    config = json.loads((other / "config.json").read_text())
    config["model_type"] = "mistral"
    (other / "config.json").write_text(json.dumps(config))
    code, _, err = invoke(
        runner, "validate", str(write(tmp_path / "r.yaml", linear_of(family["a"], other)))
    )
    assert code == 4  # incompatible models: the code run and plan give
    assert f"models[1]: {other} is a `mistral` model but {family['a']} is `llama`" in err


def test_overflow_of_the_output_dtype(
    family: dict[str, Path], tmp_path: Path, runner: CliRunner
) -> None:
    big = copy_model(family, "b", tmp_path / "big")
    tensors = load_file(str(big / "model.safetensors"))
    tensors["model.norm.weight"][0] = 1e6
    save_file(tensors, str(big / "model.safetensors"), metadata={"format": "pt"})
    recipe = write(tmp_path / "r.yaml", linear_of(family["a"], big) + "out_dtype: float16\n")
    code, _, err = invoke(runner, "run", str(recipe), "-o", str(tmp_path / "out"))
    assert code == 4
    assert (
        "merged tensor `model.norm.weight` reaches 5e+05, beyond the torch.float16 range (6.55e+04)"
        in err
    )
    assert not (tmp_path / "out").exists()
    code, _, err = invoke(
        runner, "run", str(recipe), "-o", str(tmp_path / "out"), "--clamp-overflow"
    )
    assert code == 0, err
    assert "warning: clamped 1 values of `model.norm.weight` to the output dtype's range" in err
    out = load_file(str(tmp_path / "out" / "model.safetensors"))["model.norm.weight"]
    assert float(out[0]) == float(torch.finfo(torch.float16).max)


def test_truncated_shard(family: dict[str, Path], tmp_path: Path, runner: CliRunner) -> None:
    cut = copy_model(family, "b", tmp_path / "cut")
    data = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(data[: len(data) // 2])
    code, _, err = invoke(
        runner,
        "run",
        str(write(tmp_path / "r.yaml", linear_of(family["a"], cut))),
        "-o",
        str(tmp_path / "out"),
    )
    assert code == 3
    assert "(truncated download?)" in err and "models[1].model" in err
    assert not (tmp_path / "out").exists()


def test_index_naming_a_tensor_its_shard_lacks(
    family: dict[str, Path], tmp_path: Path, runner: CliRunner
) -> None:
    bad = copy_model(family, "b", tmp_path / "badindex")
    names = list(load_file(str(bad / "model.safetensors")))
    index = {
        "metadata": {},
        "weight_map": {
            **dict.fromkeys(names, "model.safetensors"),
            "ghost.weight": "model.safetensors",
        },
    }
    (bad / "model.safetensors.index.json").write_text(json.dumps(index))
    code, _, err = invoke(
        runner, "validate", str(write(tmp_path / "r.yaml", linear_of(family["a"], bad)))
    )
    assert (
        code == 3
        and "maps `ghost.weight` to model.safetensors, but that file's header does not hold it"
        in err
    )


def test_no_weights_and_no_config(
    family: dict[str, Path], tmp_path: Path, runner: CliRunner
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    nothing = tmp_path / "nothing"
    nothing.mkdir()
    (nothing / "notes.txt").write_text("x")
    noconf = copy_model(family, "b", tmp_path / "noconf")  # weights without a config: a model
    (noconf / "config.json").unlink()
    text = linear_of(empty, nothing, noconf)
    code, _, err = invoke(runner, "validate", str(write(tmp_path / "r.yaml", text)))
    assert code == 3  # not found: the code run and plan give
    assert f"{empty}: no weights found" in err
    assert f"{nothing}: no config.json and no .safetensors file" in err
    assert str(noconf) not in err


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "the recipe is empty"),
        ("# only a comment\n", "the recipe is empty"),
        ("merge_method: linear\nmodels: 3\n", "models: Input should be a valid list (found 3)"),
        (
            "merge_method: linear\nmodels: []\n",
            "give exactly one of `models`, `slices` or `modules` (found none)",
        ),
        (
            "merge_method: passthrough\nslices: [{sources: []}]\n",
            "slices[0].sources: List should have at least 1 item after validation, not 0",
        ),
        (
            "merge_method: linear\nmodels:\n  - model: ''\n",
            "models[0].model: a model reference cannot be empty",
        ),
        (
            "merge_method: 12\nmodels:\n  - model: a/b\n",
            "merge_method: Input should be a valid string (found 12)",
        ),
        (
            "merge_method: ties\nmodels:\n  - model: a/b\n    parameters: {weight: 1, density: 1.5}\n",
            "models[0].parameters.density: 1.5 is out of range; allowed: a number in [0.0, 1.0]",
        ),
        (
            "merge_method: dare_ties\nbase_model: x/y\nparameters: {rescale_mode: l2}\nmodels:\n  - model: a/b\n    parameters: {weight: 1}\n",
            "parameters.rescale_mode: expected one of l1, inverse_density, found 'l2'",
        ),
        (
            "merge_method: slerp\nbase_model: a/b\nmodels:\n  - model: c/d\n",
            "parameters: missing required parameter `t` for method `slerp`",
        ),
        (
            "merge_method: karcher\nparameters: {max_iter: 2.5}\nmodels:\n  - model: a/b\n  - model: c/d\n",
            "parameters.max_iter: expected an integer >= 1, found 2.5",
        ),
    ],
)
def test_recipe_battery(tmp_path: Path, runner: CliRunner, text: str, message: str) -> None:
    code, out, err = invoke(runner, "validate", str(write(tmp_path / "r.yaml", text)))
    assert code == 2 and out == ""
    assert message in err
    assert "Traceback" not in err


def test_a_ten_megabyte_recipe_is_refused_unread(tmp_path: Path, runner: CliRunner) -> None:
    recipe = tmp_path / "huge.yaml"
    recipe.write_text("merge_method: linear\n" + "#" * 10_000_000 + "\n")
    code, _, err = invoke(runner, "validate", str(recipe))
    assert (
        code == 2 and "recipe file is 10000022 bytes; recipes are limited to 1000000 bytes" in err
    )


def test_non_utf8_recipe(tmp_path: Path, runner: CliRunner) -> None:
    recipe = tmp_path / "latin.yaml"
    recipe.write_bytes(b"merge_method: lin\xe9ar\n")
    code, _, err = invoke(runner, "validate", str(recipe))
    assert code == 2 and "recipe is not UTF-8 text (byte 17)" in err


def test_revision_on_a_local_folder(
    family: dict[str, Path], tmp_path: Path, runner: CliRunner
) -> None:
    recipe = write(
        tmp_path / "r.yaml",
        f"merge_method: linear\nmodels:\n  - model: {{path: {family['a']}, revision: main}}\n    parameters: {{weight: 1}}\n",
    )
    code, _, err = invoke(runner, "validate", str(recipe))
    assert code == 3 and "a revision (@main) only applies to Hub models" in err


def test_missing_recipe_file(tmp_path: Path, runner: CliRunner) -> None:
    code, _, err = invoke(runner, "validate", str(tmp_path / "nope.yaml"))
    assert code == 2 and f"recipe file {tmp_path / 'nope.yaml'} does not exist" in err


def test_different_layer_counts_in_models_form(
    family: dict[str, Path], tmp_path: Path, runner: CliRunner
) -> None:
    recipe = write(tmp_path / "r.yaml", linear_of(family["a"], family["deep"]))
    code, _, err = invoke(runner, "run", str(recipe), "-o", str(tmp_path / "out"))
    assert code == 4
    assert (
        f"models[1]: {family['deep']} has 18 tensors that {family['a']} lacks (e.g. `model.layers.3.input_layernorm.weight`)"
        in err
    )
    assert "to combine different depths use `slices:`" in err
