"""Quantized checkpoints are refused before any weight is read (#13): merged as numbers,
packed integers and scales give garbage."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from conftest import invoke, write


def quantized(
    family: dict[str, Path], dest: Path, config: dict[str, object] | None, tensor: str | None
) -> Path:
    shutil.copytree(family["b"], dest)
    if config is not None:
        data = json.loads((dest / "config.json").read_text())
        data.update(config)
        (dest / "config.json").write_text(json.dumps(data))
    if tensor is not None:
        tensors = load_file(dest / "model.safetensors")
        tensors[tensor] = torch.zeros(4, 4, dtype=torch.int32)
        save_file(tensors, str(dest / "model.safetensors"))
    return dest


CASES = [
    (
        {"quantization_config": {"quant_method": "gptq", "bits": 4}},
        None,
        "quant_method `gptq` in config.json",
    ),
    ({"quantization_config": {"quant_method": "awq"}}, None, "quant_method `awq` in config.json"),
    (
        {"quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True}},
        None,
        "quant_method `bitsandbytes`",
    ),
    (
        {"quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}},
        None,
        "quant_method `fp8`",
    ),
    (
        {"text_config": {"quantization_config": {"quant_method": "mxfp4"}}},
        None,
        "quant_method `mxfp4`",
    ),
    (None, "model.layers.0.mlp.up_proj.qweight", "`model.layers.0.mlp.up_proj.qweight`"),
    (None, "model.layers.0.mlp.up_proj.weight.SCB", "`model.layers.0.mlp.up_proj.weight.SCB`"),
]


@pytest.mark.parametrize(("config", "tensor", "message"), CASES, ids=[c[2][:24] for c in CASES])
@pytest.mark.parametrize("command", ["validate", "run"])
def test_quantized_models_are_refused(
    family: dict[str, Path],
    tmp_path: Path,
    runner: CliRunner,
    config: dict[str, object] | None,
    tensor: str | None,
    message: str,
    command: str,
) -> None:
    bad = quantized(family, tmp_path / "q", config, tensor)
    recipe = write(
        tmp_path / "r.yaml",
        f"merge_method: linear\nmodels:\n  - model: {family['a']}\n    parameters: {{weight: 1}}\n"
        f"  - model: {bad}\n    parameters: {{weight: 1}}\n",
    )
    args = [command, str(recipe), *(["-o", str(tmp_path / "out")] if command == "run" else [])]
    code, _, err = invoke(runner, *args)
    assert code == 4, err
    assert f"models[1].model: {bad} is a quantized checkpoint ({message}" in err
    assert "dequantize first" in err
    assert not (tmp_path / "out").exists()
