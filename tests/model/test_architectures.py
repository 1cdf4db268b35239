"""The architecture matrix: tiny models of many transformers families, built in the session.

For each family, linear and TIES merges must load with `from_pretrained` and give the same
logits as a model loaded from the expected state dict (computed here in float64 from
independently read tensors), and a stacking passthrough must load with its new depth.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from conftest import invoke, write
from mergecli import methods
from mergecli.methods.spec import MergeArgs
from mergecli.model.layers import split_layer

VOCAB = 96
HIDDEN = 32
DECODER = dict(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


@dataclass(frozen=True)
class Family:
    """How to build one tiny model and what to feed it."""

    make: Callable[[], tf.PreTrainedModel]
    inputs: Callable[[], dict[str, torch.Tensor]]
    depth_key: tuple[str, ...] = ("num_hidden_layers",)


def _ids() -> dict[str, torch.Tensor]:
    return {"input_ids": torch.tensor([[1, 5, 9, 12, 33, 7, 60, 3]])}


def _seq2seq() -> dict[str, torch.Tensor]:
    return {**_ids(), "decoder_input_ids": torch.tensor([[0, 4, 8, 15, 16]])}


def _vision() -> dict[str, torch.Tensor]:
    torch.manual_seed(5)
    ids = torch.tensor([[1, 95, 95, 95, 95, 9, 12, 33]])
    return {"input_ids": ids, "pixel_values": torch.randn(1, 3, 16, 16)}


def _causal(config_cls: Any, model_cls: Any, **extra: Any) -> Callable[[], tf.PreTrainedModel]:
    return lambda: model_cls(config_cls(**{**DECODER, **extra}))


def _gpt2() -> tf.PreTrainedModel:
    config = tf.GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=3, n_head=4, n_positions=64)
    return tf.GPT2LMHeadModel(config)


def _bert() -> tf.PreTrainedModel:
    config = tf.BertConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    return tf.BertForMaskedLM(config)


def _t5() -> tf.PreTrainedModel:
    config = tf.T5Config(
        vocab_size=VOCAB, d_model=HIDDEN, d_kv=8, d_ff=64, num_layers=3, num_heads=4
    )
    return tf.T5ForConditionalGeneration(config)


def _llava() -> tf.PreTrainedModel:
    text = {**DECODER, "model_type": "llama"}
    vision = dict(
        model_type="clip_vision_model",
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=16,
        patch_size=8,
        projection_dim=16,
    )
    config = tf.LlavaConfig(
        text_config=text, vision_config=vision, image_token_index=95, image_seq_length=4
    )
    return tf.LlavaForConditionalGeneration(config)


def _qwen2_vl() -> tf.PreTrainedModel:
    text = {k: v for k, v in DECODER.items() if not k.endswith("token_id")}
    text["rope_scaling"] = {"type": "mrope", "mrope_section": [1, 1, 2]}
    vision = dict(
        depth=4,
        embed_dim=16,
        hidden_size=32,
        num_heads=2,
        mlp_ratio=2,
        patch_size=2,
        spatial_merge_size=2,
        temporal_patch_size=2,
        in_chans=3,
    )
    config = tf.Qwen2VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=95,
        video_token_id=94,
        vision_start_token_id=93,
    )
    return tf.Qwen2VLForConditionalGeneration(config)


FAMILIES: dict[str, Family] = {
    "llama": Family(_causal(tf.LlamaConfig, tf.LlamaForCausalLM), _ids),
    "mistral": Family(_causal(tf.MistralConfig, tf.MistralForCausalLM), _ids),
    "qwen2": Family(_causal(tf.Qwen2Config, tf.Qwen2ForCausalLM), _ids),
    "qwen3": Family(_causal(tf.Qwen3Config, tf.Qwen3ForCausalLM, head_dim=8), _ids),
    "gemma2": Family(_causal(tf.Gemma2Config, tf.Gemma2ForCausalLM, head_dim=8), _ids),
    "gemma3": Family(_causal(tf.Gemma3TextConfig, tf.Gemma3ForCausalLM, head_dim=8), _ids),
    "phi3": Family(_causal(tf.Phi3Config, tf.Phi3ForCausalLM), _ids),
    "gpt2": Family(_gpt2, _ids, ("n_layer",)),
    "gpt_neox": Family(_causal(tf.GPTNeoXConfig, tf.GPTNeoXForCausalLM), _ids),
    "mixtral": Family(_causal(tf.MixtralConfig, tf.MixtralForCausalLM, num_local_experts=4), _ids),
    "bert": Family(_bert, _ids),
    "t5": Family(_t5, _seq2seq, ("num_decoder_layers",)),
    "llava": Family(_llava, _vision, ("text_config", "num_hidden_layers")),
    "qwen2_vl": Family(_qwen2_vl, _ids, ("text_config", "num_hidden_layers")),
}


def _save_variants(name: str, root: Path) -> dict[str, Path]:
    """base (seeded init) and a, b (base plus seeded noise), saved as float32 checkpoints."""
    torch.manual_seed(0)
    model = FAMILIES[name].make().eval()
    out = {}
    for seed, variant in enumerate(["base", "a", "b"]):
        generator = torch.Generator().manual_seed(100 + seed)
        copy = FAMILIES[name].make().eval()
        copy.load_state_dict(model.state_dict())
        if variant != "base":
            with torch.no_grad():
                for param in copy.parameters():
                    param.add_(0.02 * torch.randn(param.shape, generator=generator))
        copy.save_pretrained(root / variant)
        out[variant] = root / variant
    return out


@pytest.fixture(scope="session")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    """Every family saved as base/a/b."""
    root = tmp_path_factory.mktemp("zoo")
    return {name: _save_variants(name, root / name) for name in FAMILIES}


def _state(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def _merged_state(out: Path) -> dict[str, torch.Tensor]:
    index = json.loads((out / "model.safetensors.index.json").read_text())
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(index["weight_map"].values())):
        state.update(load_file(str(out / shard)))
    return state


def _run(runner: CliRunner, tmp_path: Path, text: str) -> Path:
    out = tmp_path / "out"
    code, _, err = invoke(runner, "run", str(write(tmp_path / "r.yaml", text)), "-o", str(out))
    assert code == 0, err
    return out


def _logits(folder: Path, name: str) -> torch.Tensor:
    model_cls = type(FAMILIES[name].make())
    model = model_cls.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(**FAMILIES[name].inputs()).logits  # type: ignore[no-any-return]


def _check_against(out: Path, expected: dict[str, torch.Tensor], name: str, tmp: Path) -> None:
    """The output holds `expected` (float32 rounding of float64 math) and its logits equal
    those of a checkpoint made from `expected` with the output's config."""
    merged = _merged_state(out)
    assert set(merged) == set(expected)
    for key, value in expected.items():
        scale = float(value.abs().max()) + 1.0
        assert (merged[key].double() - value).abs().max() <= 8 * 1.2e-7 * scale, key
    reference = tmp / "reference"
    reference.mkdir()
    shutil.copyfile(out / "config.json", reference / "config.json")
    save_file(
        {k: v.float().contiguous() for k, v in expected.items()},
        str(reference / "model.safetensors"),
    )
    torch.testing.assert_close(_logits(out, name), _logits(reference, name), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_linear_merge_loads_with_exact_logits(
    name: str, zoo: dict[str, dict[str, Path]], tmp_path: Path, runner: CliRunner
) -> None:
    paths = zoo[name]
    out = _run(
        runner,
        tmp_path,
        "merge_method: linear\nmodels:\n"
        f"  - model: {paths['a']}\n    parameters: {{weight: 0.7}}\n"
        f"  - model: {paths['b']}\n    parameters: {{weight: 0.3}}\n",
    )
    a, b = _state(paths["a"]), _state(paths["b"])
    expected = {k: 0.7 * a[k].double() + 0.3 * b[k].double() for k in a}
    _check_against(out, expected, name, tmp_path)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_ties_merge_loads_with_exact_logits(
    name: str, zoo: dict[str, dict[str, Path]], tmp_path: Path, runner: CliRunner
) -> None:
    paths = zoo[name]
    out = _run(
        runner,
        tmp_path,
        f"merge_method: ties\nbase_model: {paths['base']}\nmodels:\n"
        f"  - model: {paths['a']}\n    parameters: {{weight: 0.6, density: 0.5}}\n"
        f"  - model: {paths['b']}\n    parameters: {{weight: 0.4, density: 0.7}}\n",
    )
    spec = methods.get("ties")
    assert spec is not None
    base, a, b = (_state(paths[k]) for k in ("base", "a", "b"))
    params = {p.name: p.default for p in spec.scoped("global")}
    per_model = [{"weight": 0.6, "density": 0.5}, {"weight": 0.4, "density": 0.7}]
    expected = {
        k: methods.apply(
            spec, MergeArgs([a[k].double(), b[k].double()], base[k].double(), params, per_model)
        )
        for k in base
    }
    _check_against(out, expected, name, tmp_path)


FIRST_SLICE = ("model.embed_tokens.weight", "gpt_neox.embed_in.weight", "transformer.wte.weight")
LAST_SLICE = ("lm_head.weight", "embed_out.weight", "model.norm.weight", "transformer.ln_f.weight")


def _depth(config: dict[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        config = config[key]
    return config


@pytest.mark.parametrize("name", list(FAMILIES))
def test_stacking_passthrough_gives_new_depth(
    name: str, zoo: dict[str, dict[str, Path]], tmp_path: Path, runner: CliRunner
) -> None:
    paths = zoo[name]
    out = _run(
        runner,
        tmp_path,
        "merge_method: passthrough\nslices:\n"
        f"  - sources:\n      - model: {paths['base']}\n        layer_range: [0, 2]\n"
        f"  - sources:\n      - model: {paths['a']}\n        layer_range: [1, 3]\n",
    )
    config = json.loads((out / "config.json").read_text())
    source_config = json.loads((paths["base"] / "config.json").read_text())
    assert _depth(config, FAMILIES[name].depth_key) == 4
    merged, base, a = _merged_state(out), _state(paths["base"]), _state(paths["a"])
    layers = [(key, s) for key in merged if (s := split_layer(key)) is not None]
    main = max(
        {s.stack for _, s in layers if "vis" not in s.stack},
        key=lambda st: max(s.index for _, s in layers if s.stack == st),
    )
    for key, split in layers:
        if split.stack != main:
            continue
        origin = (base, split.index) if split.index < 2 else (a, split.index - 1)
        assert torch.equal(merged[key], origin[0][split.with_index(origin[1])]), key
    assert max(s.index for _, s in layers if s.stack == main) == 3
    for key in set(FIRST_SLICE) & set(merged):
        assert torch.equal(merged[key], base[key]), key
    for key in set(LAST_SLICE) & set(merged):
        assert torch.equal(merged[key], a[key]), key
    lists = {k: v for k, v in source_config.items() if isinstance(v, list) and len(v) == 3}
    for key, value in lists.items():
        assert config[key] == [value[0], value[1], value[1], value[2]], key
    logits = _logits(out, name)
    assert torch.isfinite(logits).all() and logits.shape[-1] == VOCAB
