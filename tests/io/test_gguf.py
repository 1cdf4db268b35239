"""GGUF files as inputs (#13): read with the `gguf` package, dequantized to float32, under
transformers' names and with llama.cpp's conversion undone."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import invoke, write

gguf = pytest.importorskip("gguf")

N_HEAD, N_KV = 4, 2  # conftest.llama_config


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's Q/K row order (its convert script's `permute`)."""
    return (
        w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def write_gguf(folder: Path, path: Path, qtype: str = "F32", int_embedding: bool = False) -> Path:
    """Convert the Llama in `folder` to GGUF the way llama.cpp does: its tensor names, Q/K
    permuted, 2-D weights in `qtype`, norms in F32."""
    config = json.loads((folder / "config.json").read_text())
    state = load_file(folder / "model.safetensors")
    layers = config["num_hidden_layers"]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, layers)
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(layers)
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    tokens = list(json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"])
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    writer.add_token_merges([])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    for hf_name, tensor in state.items():
        stem, suffix = hf_name.rsplit(".", 1)
        data = tensor.float().numpy()
        if "q_proj" in hf_name:
            data = _permute(data, N_HEAD)
        elif "k_proj" in hf_name:
            data = _permute(data, N_KV)
        kind = gguf.GGMLQuantizationType[qtype] if data.ndim == 2 else gguf.GGMLQuantizationType.F32
        gguf_name = f"{names.get_name(stem)}.{suffix}"
        if int_embedding and "embed_tokens" in hf_name:
            writer.add_tensor(gguf_name, data.astype(np.int32))
        elif kind in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            writer.add_tensor(gguf_name, data.astype(np.float16 if qtype == "F16" else np.float32))
        else:
            writer.add_tensor(gguf_name, gguf.quants.quantize(data, kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def reference(path: Path) -> dict[str, torch.Tensor]:
    """transformers' own GGUF loader (the path `from_pretrained(gguf_file=...)` takes)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    fields = dict(load_gguf_checkpoint(str(path))["config"])
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]


def read_all(path: Path) -> tuple[dict[str, object], dict[str, torch.Tensor]]:
    from mergecli.io.checkpoint import load_model_info
    from mergecli.io.gguf_input import GgufSource
    from mergecli.io.reader import TensorReader

    info = load_model_info(GgufSource(path, "m"))
    reader = TensorReader()
    try:
        return info.config, {name: reader.read(info, name) for name in info.tensors}
    finally:
        reader.close()


def test_f32_gguf_reads_back_the_original_model(family: dict[str, Path], tmp_path: Path) -> None:
    path = write_gguf(family["a"], tmp_path / "a.gguf")
    config, tensors = read_all(path)
    original = load_file(family["a"] / "model.safetensors")
    assert set(tensors) == set(original)
    for name, tensor in original.items():
        assert torch.equal(tensors[name], tensor), name  # Q/K permutation undone exactly
    hf = json.loads((family["a"] / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    for key in ("model_type", "hidden_size", "num_hidden_layers", "num_key_value_heads"):
        assert config[key] == hf[key], key


def test_q8_0_gguf_is_dequantized_like_transformers(
    family: dict[str, Path], tmp_path: Path
) -> None:
    path = write_gguf(family["a"], tmp_path / "a-q8.gguf", "Q8_0")
    _, tensors = read_all(path)
    expected = reference(path)
    assert set(tensors) == set(expected)
    original = load_file(family["a"] / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight"
    assert tensors[name].dtype == torch.float32
    for key, tensor in expected.items():
        assert torch.equal(tensors[key], tensor), key
    # Q8_0: one scale per 32 values, |error| <= scale / 2 = amax / 254
    error = (tensors[name] - original[name]).abs().max().item()
    assert 0 < error <= original[name].abs().max().item() / 254 + 1e-7


def test_f16_gguf_keeps_half_precision(family: dict[str, Path], tmp_path: Path) -> None:
    _, tensors = read_all(write_gguf(family["a"], tmp_path / "a-f16.gguf", "F16"))
    original = load_file(family["a"] / "model.safetensors")
    name = "model.layers.1.mlp.down_proj.weight"
    assert tensors[name].dtype == torch.float16
    assert torch.equal(tensors[name], original[name].half())


def test_a_recipe_merges_gguf_files(
    family: dict[str, Path], tmp_path: Path, runner: CliRunner
) -> None:
    a = write_gguf(family["a"], tmp_path / "a-q8.gguf", "Q8_0")
    b = write_gguf(family["b"], tmp_path / "b-f16.gguf", "F16")
    recipe = write(
        tmp_path / "r.yaml",
        f"merge_method: linear\ndtype: float32\nmodels:\n  - model: {a}\n"
        f"    parameters: {{weight: 1}}\n  - model: {b}\n    parameters: {{weight: 3}}\n",
    )
    code, _, err = invoke(runner, "run", str(recipe), "-o", str(tmp_path / "out"))
    assert code == 0, err
    merged = load_file(tmp_path / "out" / "model.safetensors")
    ta, tb = reference(a), reference(b)
    assert set(merged) == set(ta)
    for name in ("model.layers.2.self_attn.k_proj.weight", "lm_head.weight"):
        expected = (ta[name].double() + 3 * tb[name].double()) / 4
        torch.testing.assert_close(merged[name].double(), expected, rtol=0, atol=1e-6)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 3
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(a.parent, gguf_file=a.name).save_pretrained(tmp_path / "tok")
    written = json.loads((tmp_path / "out" / "tokenizer.json").read_text())
    assert written == json.loads((tmp_path / "tok" / "tokenizer.json").read_text())


def test_a_damaged_gguf_is_refused(tmp_path: Path, runner: CliRunner) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 40)
    recipe = write(tmp_path / "r.yaml", f"merge_method: passthrough\nmodels:\n  - model: {bad}\n")
    code, _, err = invoke(runner, "run", str(recipe), "-o", str(tmp_path / "out"))
    assert code == 3, err
    assert "bad.gguf is not a readable GGUF file" in err
    assert not (tmp_path / "out").exists()


def test_a_type_gguf_cannot_dequantize_is_refused(
    family: dict[str, Path], tmp_path: Path, runner: CliRunner
) -> None:
    path = write_gguf(family["a"], tmp_path / "int.gguf", int_embedding=True)
    recipe = write(tmp_path / "r.yaml", f"merge_method: passthrough\nmodels:\n  - model: {path}\n")
    code, _, err = invoke(runner, "run", str(recipe), "-o", str(tmp_path / "out"))
    assert code == 4, err
    assert "`token_embd.weight` is stored as I32, which the gguf package cannot dequantize" in err


def test_without_the_gguf_package_the_fix_is_named(
    family: dict[str, Path], tmp_path: Path, runner: CliRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_gguf(family["a"], tmp_path / "a.gguf")
    monkeypatch.setitem(sys.modules, "gguf", None)
    recipe = write(tmp_path / "r.yaml", f"merge_method: passthrough\nmodels:\n  - model: {path}\n")
    code, _, err = invoke(runner, "run", str(recipe), "-o", str(tmp_path / "out"))
    assert code == 4, err
    assert "reading GGUF files needs the `gguf` package" in err
    assert "pip install 'mergecli[gguf]'" in err
