"""Real PEFT adapters, built in the test session on the tiny models."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel, LlamaForCausalLM, PreTrainedModel

from conftest import llama_config, save_model

LLAMA = {
    "plain": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
    "rslora": {
        "r": 8,
        "lora_alpha": 4,
        "use_rslora": True,
        "target_modules": r".*\.self_attn\.(q|k|v|o)_proj",
    },
    "patterns": {
        "r": 4,
        "lora_alpha": 8,
        "target_modules": ["q_proj", "v_proj", "down_proj"],
        "rank_pattern": {"q_proj": 2, "layers.1.self_attn.v_proj": 6},
        "alpha_pattern": {"down_proj": 3},
    },
    "regex_mlp": {"r": 2, "lora_alpha": 5, "target_modules": r".*mlp\.(gate|up|down)_proj"},
    "modules_to_save": {
        "r": 4,
        "lora_alpha": 4,
        "target_modules": ["k_proj"],
        "modules_to_save": ["input_layernorm"],
    },
    "dora": {
        "r": 4,
        "lora_alpha": 8,
        "target_modules": ["q_proj", "v_proj", "gate_proj"],
        "use_dora": True,
    },
    "embedding": {"r": 4, "lora_alpha": 8, "target_modules": ["embed_tokens", "lm_head", "o_proj"]},
    "dora_embedding": {
        "r": 3,
        "lora_alpha": 6,
        "target_modules": ["embed_tokens"],
        "use_dora": True,
    },
}
GPT2 = {
    "gpt2_conv1d": {
        "r": 4,
        "lora_alpha": 8,
        "target_modules": ["c_attn", "c_proj", "c_fc"],
        "fan_in_fan_out": True,
    },
    "gpt2_bias": {
        "r": 2,
        "lora_alpha": 2,
        "target_modules": ["c_attn"],
        "fan_in_fan_out": True,
        "lora_bias": True,
    },
    "gpt2_trained_bias": {
        "r": 2,
        "lora_alpha": 4,
        "target_modules": ["c_attn", "c_fc"],
        "fan_in_fan_out": True,
        "bias": "lora_only",
    },
}


def perturb(model: PreTrainedModel, seed: int) -> None:
    """Give every trainable tensor (LoRA matrices, DoRA magnitudes, modules_to_save) values
    a trained adapter could have: B is zero and magnitudes are norms at initialisation."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                noise = torch.randn(param.shape, generator=generator)
                if "magnitude" in name:
                    param.mul_(1 + 0.1 * noise)
                else:
                    param.add_(0.1 * noise)


def make_adapter(
    base: Path, out: Path, settings: dict[str, Any], seed: int, gpt2: bool = False, **save: Any
) -> Path:
    """A PEFT LoRA adapter of `base` with `settings`, trained-looking weights, saved."""
    loader = GPT2LMHeadModel if gpt2 else LlamaForCausalLM
    model = get_peft_model(loader.from_pretrained(base), LoraConfig(**settings))
    perturb(model, seed)
    model.save_pretrained(out, **save)
    return out


def merged_reference(base: Path, adapter: Path, gpt2: bool = False) -> PreTrainedModel:
    """PEFT's own fold: the adapter loaded on its base, `merge_and_unload()`."""
    loader = GPT2LMHeadModel if gpt2 else LlamaForCausalLM
    return PeftModel.from_pretrained(loader.from_pretrained(base), adapter).merge_and_unload()


@pytest.fixture(scope="session")
def lora_family(
    tmp_path_factory: pytest.TempPathFactory, family: dict[str, Path]
) -> dict[str, Path]:
    """The Llama family's base and a GPT-2 base, and one adapter per configuration."""
    root = tmp_path_factory.mktemp("adapters")
    gpt2 = root / "gpt2"
    torch.manual_seed(11)
    GPT2LMHeadModel(
        GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32)
    ).save_pretrained(gpt2)
    out = {"base": family["base"], "gpt2": gpt2}
    for seed, (name, settings) in enumerate(LLAMA.items()):
        out[name] = make_adapter(family["base"], root / name, settings, seed)
    for seed, (name, settings) in enumerate(GPT2.items()):
        out[name] = make_adapter(gpt2, root / name, settings, 50 + seed, gpt2=True)
    out["bin"] = make_adapter(
        family["base"], root / "bin", LLAMA["plain"], 99, safe_serialization=False
    )
    for seed in range(3):
        out[f"tune{seed}"] = make_adapter(
            family["base"],
            root / f"tune{seed}",
            {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"},
            200 + seed,
        )
    out["ia3"] = _ia3(family["base"], root / "ia3")
    out["wide"] = family["wide"]
    out["other"] = save_model(root / "other-base", llama_config(), 31)
    return out


def _ia3(base: Path, out: Path) -> Path:
    from peft import IA3Config

    model = get_peft_model(
        LlamaForCausalLM.from_pretrained(base),
        IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
    )
    model.save_pretrained(out)
    return out
