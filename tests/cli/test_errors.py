"""The one error boundary: every command renders errors through the same table."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import ClassVar

import click
import pytest
import typer
from huggingface_hub import errors as hub
from typer.testing import CliRunner

from conftest import invoke, write
from mergecli.cli import app
from mergecli.cli._errors import exit_code_of
from mergecli.io import source as source_module


def _commands(group: typer.Typer) -> list[typer.models.CommandInfo]:
    found = list(group.registered_commands)
    for sub in group.registered_groups:
        assert sub.typer_instance is not None
        found += _commands(sub.typer_instance)
    return found


def test_every_command_is_guarded() -> None:
    commands = _commands(app)
    names = {info.name or (info.callback.__name__ if info.callback else "") for info in commands}
    assert {"run", "validate", "plan", "methods", "list", "show", "cp"} <= names
    assert all(getattr(info.callback, "guarded", False) for info in commands)


def _damaged(family: dict[str, Path], dest: Path, file: str, text: str) -> Path:
    shutil.copytree(family["a"], dest)
    (dest / file).write_text(text, encoding="utf-8")
    return dest


DAMAGED = [
    ("tokenizer.json", '{"model": {"type": "WordLevel", "vocab": {"a": 0'),
    ("tokenizer.json", "[" * 100_000),
    ("tokenizer_config.json", '{"chat_template": '),
    ("config.json", '{"model_type": "llama", '),
]


@pytest.mark.parametrize("command", ["validate", "plan", "run"])
@pytest.mark.parametrize(("file", "text"), DAMAGED, ids=lambda v: str(v)[:24])
def test_a_damaged_input_file_is_exit_3_naming_it_in_every_command(
    family: dict[str, Path],
    tmp_path: Path,
    runner: CliRunner,
    command: str,
    file: str,
    text: str,
) -> None:
    bad = _damaged(family, tmp_path / "bad", file, text)
    recipe = write(
        tmp_path / "r.yaml",
        "merge_method: linear\nchat_template: auto\nmodels:\n"
        f"  - model: {family['b']}\n    parameters: {{weight: 1}}\n"
        f"  - model: {bad}\n    parameters: {{weight: 1}}\n",
    )
    args = [command, str(recipe)] + (["-o", str(tmp_path / "out")] if command == "run" else [])
    code, _, err = invoke(runner, *args)
    assert code == 3, err
    assert f"{bad}: cannot read {file}:" in err
    if file != "tokenizer_config.json":  # read with the model, so placed in the recipe
        assert f"models[1].model: {bad}: cannot read {file}:" in err
    assert "Traceback" not in err and "internal error" not in err
    assert not (tmp_path / "out").exists()


def _raise(exc: BaseException) -> object:
    def fail(*args: object, **kwargs: object) -> object:
        raise exc

    return fail


class _Response:
    """Just what huggingface_hub's HTTP errors read from a response."""

    status_code = 404
    headers: ClassVar[dict[str, str]] = {}
    request = None
    url = "http://127.0.0.1/api/models/org/model"

    def json(self) -> dict[str, str]:
        return {}


HUB_CASES = [
    (hub.RepositoryNotFoundError("404 repo", response=_Response()), 3, "check the repo id"),  # type: ignore[arg-type]
    (hub.RevisionNotFoundError("404 revision", response=_Response()), 3, "check the branch"),  # type: ignore[arg-type]
    (ConnectionError("connection refused"), 3, "check the network"),
    (ValueError("a bug in the caller"), 1, "this is a bug in mergecli"),
    (KeyError("sha"), 1, "this is a bug in mergecli"),
]


@pytest.mark.parametrize(("exc", "code", "hint"), HUB_CASES, ids=lambda v: type(v).__name__)
def test_hub_exceptions_are_mapped_by_type(
    tmp_path: Path,
    runner: CliRunner,
    monkeypatch: pytest.MonkeyPatch,
    exc: BaseException,
    code: int,
    hint: str,
) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(source_module, "hub_offline", lambda: False)
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", _raise(exc))
    recipe = write(
        tmp_path / "r.yaml",
        "merge_method: linear\nmodels:\n  - model: org/model\n    parameters: {weight: 1}\n",
    )
    got, _, err = invoke(runner, "validate", str(recipe))
    assert got == code, err
    assert hint in err
    if code == 1:
        assert "not found" not in err and "internal error" in err


@pytest.mark.parametrize(
    ("codes", "expected"), [([2], 2), ([3], 3), ([4, 3], 3), ([4, 2, 3], 2), ([5, 4], 4)]
)
def test_one_exit_code_for_several_failed_recipes(codes: list[int], expected: int) -> None:
    assert exit_code_of(codes) == expected


def test_validate_of_several_recipes_exits_with_their_code(
    family: dict[str, Path], tmp_path: Path, runner: CliRunner
) -> None:
    bad = _damaged(family, tmp_path / "bad", "tokenizer.json", "{")
    good = write(
        tmp_path / "good.yaml",
        f"merge_method: linear\nmodels:\n  - model: {family['a']}\n    parameters: {{weight: 1}}\n",
    )
    damaged = write(
        tmp_path / "damaged.yaml",
        f"merge_method: linear\nmodels:\n  - model: {bad}\n    parameters: {{weight: 1}}\n",
    )
    code, out, err = invoke(runner, "validate", str(good), str(damaged))
    assert code == 3
    assert f"ok: {good}" in out
    assert "1 of 2 recipes invalid" in err


def test_click_usage_errors_keep_exit_2(runner: CliRunner) -> None:
    code, _, err = invoke(runner, "run")
    assert code == click.UsageError.exit_code == 2
    assert "Missing argument 'recipe'" in err
