"""The bundled recipes: outputs pinned byte for byte by golden digests, and the wheel
ships them (`pip install` of a built wheel, then `mergecli recipes` outside the checkout)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import invoke

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
GOLDEN = Path(__file__).resolve().parent / "golden" / "bundled-recipes.json"
MANIFEST = "mergecli_manifest.json"


def digests(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_the_bundled_recipes_are_found() -> None:
    assert {p.stem for p in RECIPES} >= {"quickstart", "ties", "dare-ties", "slerp"}
    assert set(json.loads(GOLDEN.read_text())) == {p.stem for p in RECIPES}


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_bundled_recipe_outputs_match_their_golden_digests(
    runner: CliRunner, tmp_path: Path, recipe: Path
) -> None:
    """Every output file but the manifest (which records the local paths and mtimes of
    the inputs) is pinned; the manifest must list the digest of every other file."""
    out = tmp_path / recipe.stem
    code, _, err = invoke(runner, "run", str(recipe), "-o", str(out), "--quiet", "--reproducible")
    assert code == 0, err
    found = digests(out)
    manifest = json.loads((out / MANIFEST).read_text())
    del found[MANIFEST]
    assert manifest["outputs"] == found
    if os.environ.get("MERGECLI_UPDATE_GOLDEN"):
        golden = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
        GOLDEN.write_text(
            json.dumps({**golden, recipe.stem: found}, indent=1, sort_keys=True) + "\n"
        )
    assert found == json.loads(GOLDEN.read_text())[recipe.stem]


@pytest.mark.slow
def test_a_built_wheel_ships_the_bundled_recipes(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(wheels),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = wheels.glob("mergecli-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    python, mergecli = venv / "bin" / "python", venv / "bin" / "mergecli"
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
        check=True,
        capture_output=True,
    )
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("MERGECLI_RECIPES", None)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(mergecli), *args], cwd=work, env=env, capture_output=True, text=True
        )

    where = subprocess.run(
        [str(python), "-c", "import mergecli.bundled as b; print(b.__file__)"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert where.startswith(str(venv)) and "site-packages" in where
    listed = cli("recipes", "list")
    assert listed.returncode == 0 and "quickstart" in listed.stdout, listed.stderr
    copied = cli("recipes", "cp", "quickstart", ".")
    assert copied.returncode == 0, copied.stderr
    text = (work / "quickstart.yaml").read_text()
    assert str(venv) in text and str(ROOT) not in text
    done = cli("run", "quickstart.yaml", "-o", "out", "--quiet", "--reproducible")
    assert done.returncode == 0, done.stderr
    found = digests(work / "out")
    del found[MANIFEST]
    assert (
        found["model.safetensors"]
        == json.loads(GOLDEN.read_text())["quickstart"]["model.safetensors"]
    )
