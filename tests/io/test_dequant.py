"""FP8 block-scaled and MXFP4 checkpoints are dequantized exactly on read (#13): merged, they
give what their dequantized weights give; every other layout stays refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file, save_file
from transformers.integrations.mxfp4 import convert_moe_packed_tensors
from typer.testing import CliRunner

from conftest import invoke, write
from mergecli.cli._common import plan_recipe
from mergecli.engine.run import run_plan
from mergecli.io.checkpoint import Packed, TensorInfo
from mergecli.io.dequant import dequantize

BLOCK = (16, 24)  # does not divide the 32 x 64 shapes: edge blocks are partial


def _fp8_quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = weight.shape
    grid = (-(-rows // BLOCK[0]), -(-cols // BLOCK[1]))
    scale = torch.empty(grid, dtype=torch.float32)
    quantized = torch.empty_like(weight, dtype=torch.float8_e4m3fn)
    for i in range(grid[0]):
        for j in range(grid[1]):
            rs = slice(i * BLOCK[0], (i + 1) * BLOCK[0])
            cs = slice(j * BLOCK[1], (j + 1) * BLOCK[1])
            scale[i, j] = weight[rs, cs].abs().max() / 448
            quantized[rs, cs] = (weight[rs, cs] / scale[i, j]).to(torch.float8_e4m3fn)
    return quantized, scale


def _fp8_reference(quantized: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    out = quantized.double()
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            out[i, j] *= float(scale[i // BLOCK[0], j // BLOCK[1]])
    return out


@pytest.fixture(scope="module")
def fp8(family: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """family['b'] with every layer matrix stored as FP8 with 16 x 24 block scales, and the
    float64 dequantized value of each."""
    dest = tmp_path_factory.mktemp("fp8") / "b-fp8"
    shutil.copytree(family["b"], dest)
    tensors = load_file(dest / "model.safetensors")
    expected = {}
    for name in [n for n in tensors if ".layers." in n and n.endswith("proj.weight")]:
        quantized, scale = _fp8_quantize(tensors[name])
        tensors[name], tensors[f"{name}_scale_inv"] = quantized, scale
        expected[name] = _fp8_reference(quantized, scale)
    save_file(tensors, str(dest / "model.safetensors"))
    config = json.loads((dest / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": list(BLOCK),
    }
    (dest / "config.json").write_text(json.dumps(config))
    return dest, expected


def _merge(
    runner: CliRunner, tmp_path: Path, a: Path, b: Path, block_elements: int | None = None
) -> Path:
    """linear 0.25 a + 0.75 b, through the CLI, or in row blocks of `block_elements`."""
    text = (
        f"merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.25}}\n"
        f"  - model: {b}\n    parameters: {{weight: 0.75}}\n"
    )
    tmp_path.mkdir(exist_ok=True)
    recipe = write(tmp_path / "r.yaml", text)
    out = tmp_path / "out"
    if block_elements is not None:
        run_plan(plan_recipe(recipe), out, text, block_elements=block_elements)
        return out
    code, _, err = invoke(runner, "run", str(recipe), "-o", str(out))
    assert code == 0, err
    return out


@pytest.mark.parametrize("blocks", [None, 100], ids=["whole", "row-blocks"])
def test_fp8_block_scaled_weights_merge_as_their_dequantized_values(
    family: dict[str, Path],
    fp8: tuple[Path, dict],
    tmp_path: Path,
    runner: CliRunner,
    blocks: int | None,
) -> None:
    folder, expected = fp8
    out = _merge(runner, tmp_path, family["a"], folder, blocks)
    merged = load_file(out / "model.safetensors")
    a = load_file(family["a"] / "model.safetensors")
    assert not [n for n in merged if n.endswith("_scale_inv")]
    for name, value in expected.items():
        assert merged[name].dtype == torch.float32
        want = 0.25 * a[name].double() + 0.75 * value
        torch.testing.assert_close(merged[name].double(), want, rtol=1e-6, atol=1e-7)
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config


def test_fp8_rows_dequantize_as_the_whole(fp8: tuple[Path, dict]) -> None:
    folder, _ = fp8
    stored = load_file(folder / "model.safetensors")
    name = "model.layers.1.mlp.up_proj.weight"
    data, scale = stored[name], stored[f"{name}_scale_inv"]
    info = TensorInfo(name, "", "F32", tuple(data.shape))
    scale_info = TensorInfo(f"{name}_scale_inv", "", "F32", tuple(scale.shape))
    packed = TensorInfo(name, "", "F32", tuple(data.shape), Packed("fp8", info, scale_info, BLOCK))
    parts = {name: data, scale_info.name: scale}

    def read(part: TensorInfo, rows: tuple[int, int] | None) -> torch.Tensor:
        tensor = parts[part.name]
        return tensor if rows is None else tensor[rows[0] : rows[1]]

    whole = dequantize(packed, read)
    torch.testing.assert_close(whole.double(), _fp8_reference(data, scale), rtol=1e-7, atol=0)
    for rows in [(0, 5), (5, 17), (15, 16), (16, 32), (31, 64), (3, 64)]:
        assert torch.equal(dequantize(packed, read, rows), whole[rows[0] : rows[1]]), rows


@pytest.fixture(scope="module")
def oss(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny gpt-oss (4 experts) in float32, the same model with its experts stored as
    MXFP4, and that model's experts dequantized by transformers' own converter."""
    root = tmp_path_factory.mktemp("oss")
    config = tf.GptOssConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_local_experts=4,
        num_experts_per_tok=2,
        layer_types=["sliding_attention", "full_attention"],
        sliding_window=8,
    )
    torch.manual_seed(3)
    tf.GptOssForCausalLM(config).save_pretrained(root / "plain")
    tensors = load_file(root / "plain" / "model.safetensors")
    packed, twin = dict(tensors), dict(tensors)
    generator = torch.Generator().manual_seed(4)
    for name in [n for n in tensors if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        experts, cols, rows = tensors[name].shape
        blocks = torch.randint(0, 256, (experts, rows, cols // 32, 16), generator=generator)
        scales = torch.randint(118, 136, (experts, rows, cols // 32), generator=generator)
        blocks, scales = blocks.to(torch.uint8), scales.to(torch.uint8)
        del packed[name]
        packed[f"{name}_blocks"], packed[f"{name}_scales"] = blocks, scales
        twin[name] = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
    for folder, state in (("mxfp4", packed), ("twin", twin)):
        shutil.copytree(root / "plain", root / folder)
        save_file(state, str(root / folder / "model.safetensors"))
    data = json.loads((root / "mxfp4" / "config.json").read_text())
    data["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": []}
    (root / "mxfp4" / "config.json").write_text(json.dumps(data))
    return {"plain": root / "plain", "mxfp4": root / "mxfp4", "twin": root / "twin"}


def test_mxfp4_experts_merge_as_transformers_dequantizes_them(
    oss: dict[str, Path], tmp_path: Path, runner: CliRunner
) -> None:
    out = _merge(runner, tmp_path, oss["plain"], oss["mxfp4"])
    merged = load_file(out / "model.safetensors")
    plain = load_file(oss["plain"] / "model.safetensors")
    twin = load_file(oss["twin"] / "model.safetensors")
    assert set(merged) == set(twin)
    for name in twin:
        want = 0.25 * plain[name].double() + 0.75 * twin[name].double()
        torch.testing.assert_close(merged[name].double(), want, rtol=1e-6, atol=1e-7)
    stored = load_file(oss["mxfp4"] / "model.safetensors")
    name = "model.layers.0.mlp.experts.down_proj"
    byte, exponent = (
        int(stored[f"{name}_blocks"][1, 5, 0, 3]),
        int(stored[f"{name}_scales"][1, 5, 0]),
    )
    values = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]

    def e2m1(code: int) -> float:
        return (-1.0 if code & 8 else 1.0) * values[code & 7]

    # entry 2k of a group is the low nibble of byte k; the dequantized tensor is transposed
    assert float(twin[name][1, 6, 5]) == e2m1(byte & 15) * 2.0 ** (exponent - 127)
    assert float(twin[name][1, 7, 5]) == e2m1(byte >> 4) * 2.0 ** (exponent - 127)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())


def test_mxfp4_experts_read_in_row_blocks_as_whole(
    oss: dict[str, Path], tmp_path: Path, runner: CliRunner
) -> None:
    whole = load_file(
        _merge(runner, tmp_path / "w", oss["plain"], oss["mxfp4"]) / "model.safetensors"
    )
    rows = load_file(
        _merge(runner, tmp_path / "r", oss["plain"], oss["mxfp4"], 100) / "model.safetensors"
    )
    for name in whole:
        assert torch.equal(whole[name], rows[name]), name


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("drop-scale", "FP8 tensor `model.layers.0.mlp.up_proj.weight` without a"),
        ("static", "FP8 with static activation scales such as"),
        ("bad-block", "FP8 with weight_block_size [0, 16]"),
        ("scale-shape", "needs float [4, 2]"),
    ],
)
def test_inconsistent_fp8_checkpoints_are_refused(
    family: dict[str, Path],
    fp8: tuple[Path, dict],
    tmp_path: Path,
    runner: CliRunner,
    change: str,
    message: str,
) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(fp8[0], bad)
    tensors = load_file(bad / "model.safetensors")
    config = json.loads((bad / "config.json").read_text())
    name = "model.layers.0.mlp.up_proj.weight"
    if change == "drop-scale":
        del tensors[f"{name}_scale_inv"]
    elif change == "static":
        tensors["model.layers.0.mlp.up_proj.input_scale"] = torch.ones(1)
    elif change == "bad-block":
        config["quantization_config"]["weight_block_size"] = [0, 16]
    else:
        tensors[f"{name}_scale_inv"] = torch.ones(3, 2)
    save_file(tensors, str(bad / "model.safetensors"))
    (bad / "config.json").write_text(json.dumps(config))
    recipe = write(
        tmp_path / "r.yaml",
        f"merge_method: linear\nmodels:\n  - model: {family['a']}\n    parameters: {{weight: 1}}\n"
        f"  - model: {bad}\n    parameters: {{weight: 1}}\n",
    )
    code, _, err = invoke(runner, "validate", str(recipe))
    assert code == 4, err
    flat = " ".join(err.split())
    assert f"models[1].model: {bad} is a quantized checkpoint (" in flat
    assert message in flat, err
    assert "mergecli dequantizes FP8 with `weight_scale_inv` block scales" in flat
