"""Regenerate the bundled tiny LoRA adapters deterministically (needs `peft`).

    python recipes/models/make_tiny_adapters.py

Writes `tiny-lora-chat` and `tiny-lora-math` (rank 8 on every attention and MLP matrix)
and `tiny-lora-code` (rank 4 rsLoRA on the attention matrices, DoRA) beside this file: real PEFT adapters of
`tiny-llama-base`, their weights seeded perturbations as training would leave them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaForCausalLM

HERE = Path(__file__).resolve().parent
ADAPTERS = {
    "tiny-lora-chat": (
        1,
        {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj",
                                                      "gate_proj", "up_proj", "down_proj"]},
    ),
    "tiny-lora-math": (
        3,
        {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj",
                                                      "gate_proj", "up_proj", "down_proj"]},
    ),
    "tiny-lora-code": (
        2,
        {"r": 4, "lora_alpha": 8, "use_rslora": True, "use_dora": True,
         "target_modules": r".*\.self_attn\.(q|k|v|o)_proj"},
    ),
}


def main() -> None:
    """Write the adapters; their config names the base as the recipes do."""
    for name, (seed, settings) in ADAPTERS.items():
        torch.manual_seed(seed)  # PEFT draws A's start from the global generator
        base = LlamaForCausalLM.from_pretrained(HERE / "tiny-llama-base", torch_dtype=torch.float32)
        model = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", **settings))
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for param_name, param in model.named_parameters():
                if param.requires_grad:
                    noise = torch.randn(param.shape, generator=generator)
                    param.mul_(1 + 0.05 * noise) if "magnitude" in param_name else param.add_(0.02 * noise)
        folder = HERE / name
        shutil.rmtree(folder, ignore_errors=True)
        model.save_pretrained(folder)
        config_file = folder / "adapter_config.json"
        config = json.loads(config_file.read_text())
        config["base_model_name_or_path"] = "models/tiny-llama-base"
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (folder / "README.md").unlink(missing_ok=True)


if __name__ == "__main__":
    main()
