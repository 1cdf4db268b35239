"""`--device`: cpu, auto (cuda when torch sees one) and cuda; the CUDA path runs only with a GPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import invoke, write


def recipe(family: dict[str, Path], tmp_path: Path) -> Path:
    return write(
        tmp_path / "r.yaml",
        f"merge_method: dare_ties\nbase_model: {family['base']}\nseed: 4\nmodels:\n"
        f"  - model: {family['a']}\n    parameters: {{weight: 0.6, density: 0.5}}\n"
        f"  - model: {family['b']}\n    parameters: {{weight: 0.4, density: 0.7}}\n",
    )


def run(runner: CliRunner, path: Path, out: Path, *extra: str) -> tuple[int, str]:
    code, _, err = invoke(runner, "run", str(path), "-o", str(out), "-q", "--reproducible", *extra)
    return code, err


def test_cpu_and_auto_without_a_gpu_give_the_same_bytes(
    family: dict[str, Path], tmp_path: Path, runner: CliRunner
) -> None:
    path = recipe(family, tmp_path)
    assert run(runner, path, tmp_path / "default")[0] == 0
    assert run(runner, path, tmp_path / "cpu", "--device", "cpu")[0] == 0
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "default" / name).read_bytes() == (tmp_path / "cpu" / name).read_bytes()
    code, err = run(runner, path, tmp_path / "bad", "--device", "tpu")
    assert code == 2 and "Invalid value for '--device'" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_a_clear_usage_error(
    family: dict[str, Path], tmp_path: Path, runner: CliRunner
) -> None:
    code, err = run(runner, recipe(family, tmp_path), tmp_path / "o", "--device", "cuda")
    assert code == 2
    assert "--device cuda: torch sees no CUDA GPU" in err and "use --device cpu or auto" in err
    assert not (tmp_path / "o").exists()
    assert run(runner, recipe(family, tmp_path), tmp_path / "auto", "--device", "auto")[0] == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("method", ["linear", "ties", "dare_ties", "slerp"])
def test_cuda_matches_cpu(
    family: dict[str, Path], tmp_path: Path, runner: CliRunner, method: str
) -> None:
    one = method == "slerp"
    models = [family["a"]] if one else [family["a"], family["b"]]
    params = "" if one else "\n    parameters: {weight: 0.5, density: 0.6}"
    extra = "parameters: {t: 0.3}\n" if one else ""
    base = "" if method == "linear" else f"base_model: {family['base']}\n"
    text = f"merge_method: {method}\n{base}{extra}models:\n" + "".join(
        f"  - model: {m}{params}\n" for m in models
    )
    path = write(
        tmp_path / "r.yaml", text.replace(", density: 0.6", "") if method == "linear" else text
    )
    assert run(runner, path, tmp_path / "cpu")[0] == 0
    assert run(runner, path, tmp_path / "gpu", "--device", "cuda")[0] == 0
    from safetensors.torch import load_file

    cpu, gpu = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("cpu", "gpu"))
    for name in cpu:
        torch.testing.assert_close(gpu[name], cpu[name], rtol=1e-5, atol=1e-6)
