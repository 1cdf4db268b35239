"""Make a benchmark model family: a random base with real architecture shapes and N
"fine-tunes", saved as sharded safetensors like Hub checkpoints.

    python benchmarks/make_family.py --size 0.5b --out benchmarks/_work/0.5b [--sparsity 0.9]

Fine-tunes are realistic by default: every entry changes, as in a full SFT. A 2-D weight's
task vector is a rank-8 part (std 0.001) plus noise on every entry (std 0.002, the DARE
paper's "mostly within 0.005") plus 1% larger entries (std 0.02); a 1-D weight's is the
noise and the larger entries. `--sparsity S` leaves a fraction S of the entries unchanged
(0.9: the old sparse family, where only 10% of the entries move).

Generated one shard at a time (every tensor from its own seed), so a family larger than
RAM is written without ever holding a model in memory.

`--adapters N` also writes N PEFT LoRA adapters of the base (`lora1`, ...): rank `--rank`
(64) on every attention and MLP matrix, alpha 2 * rank, bf16, as PEFT's `save_pretrained`
lays them out (`adapter_config.json`, `adapter_model.safetensors`). `--only-adapters` adds
them to a family already written.

Sizes: tiny (hidden 64), 0.5b (Qwen2-0.5B shapes, untied head: 630 M parameters, 1.26 GB
in bf16), 1.5b (Qwen2-1.5B shapes), 3b (Qwen2.5-3B shapes, tied head: 3.09 B parameters,
6.2 GB in bf16).
"""

from __future__ import annotations

import argparse
import json
import zlib
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import Qwen2Config, Qwen2ForCausalLM

SIZES = {
    "tiny": {
        "hidden_size": 64,
        "intermediate_size": 256,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 1024,
    },
    "0.5b": {
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
    },
    "3b": {
        "hidden_size": 2048,
        "intermediate_size": 11008,
        "num_hidden_layers": 36,
        "num_attention_heads": 16,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "tie_word_embeddings": True,
    },
    "1.5b": {
        "hidden_size": 1536,
        "intermediate_size": 8960,
        "num_hidden_layers": 28,
        "num_attention_heads": 12,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
    },
}


def shapes(size: str) -> tuple[Qwen2Config, dict[str, tuple[int, ...]]]:
    """The config and every tensor's shape, from a model built on the meta device."""
    fields = {"tie_word_embeddings": False, **SIZES[size]}
    config = Qwen2Config(**fields, torch_dtype="bfloat16", architectures=["Qwen2ForCausalLM"])
    with torch.device("meta"):
        model = Qwen2ForCausalLM(config)
    state = model.state_dict()
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return config, {name: tuple(t.shape) for name, t in state.items()}


def _generator(name: str, model: int) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(name.encode()) * 64 + model)


def base_tensor(name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """The base's tensor `name` (float32; std 0.02, norms around 1 as in trained models)."""
    values = torch.randn(shape, generator=_generator(name, 0)) * 0.02
    return values + 1 if name.endswith("norm.weight") else values


def task_vector(name: str, shape: tuple[int, ...], model: int, sparsity: float) -> torch.Tensor:
    """Fine-tune `model`'s delta on `name`: dense by default, as a full fine-tune's."""
    gen = _generator(name, model)
    delta = torch.randn(shape, generator=gen) * 0.002
    larger = torch.rand(shape, generator=gen) < 0.01
    delta += larger * torch.randn(shape, generator=gen) * 0.02
    if len(shape) == 2:
        rank = 8
        left = torch.randn(shape[0], rank, generator=gen)
        right = torch.randn(rank, shape[1], generator=gen)
        delta.addmm_(left, right, alpha=0.001 / rank**0.5)
    if sparsity > 0:
        delta *= torch.rand(shape, generator=gen) >= sparsity
    return delta


def save_sharded(
    folder: Path,
    config: Qwen2Config,
    layout: dict[str, tuple[int, ...]],
    make: Callable[[str, tuple[int, ...]], torch.Tensor],
    shards: int,
) -> None:
    """Save as `shards` files with an index, the way save_pretrained lays them out; each
    shard's tensors are made by `make(name, shape)` just before it is written."""
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    names = list(layout)
    per = -(-len(names) // shards)
    weight_map = {}
    total = 0
    for i in range(shards):
        part = {n: make(n, layout[n]).to(torch.bfloat16) for n in names[i * per : (i + 1) * per]}
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file(part, str(folder / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
        total += sum(t.numel() * t.element_size() for t in part.values())
        del part
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def save_adapter(
    folder: Path, base: Path, layout: dict[str, tuple[int, ...]], k: int, rank: int
) -> None:
    """A trained-looking rank-`rank` LoRA adapter of `base` on every attention and MLP
    matrix: A like PEFT's Kaiming start, B as training leaves it (small, dense)."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, shape in layout.items():
        module = name.removesuffix(".weight")
        if not name.endswith(".weight") or module.rsplit(".", 1)[-1] not in LORA_TARGETS:
            continue
        gen = _generator(name, 100 + k)
        prefix = f"base_model.model.{module}"
        a = torch.randn(rank, shape[1], generator=gen) / shape[1] ** 0.5
        b = torch.randn(shape[0], rank, generator=gen) * 0.001
        tensors[f"{prefix}.lora_A.weight"] = a.to(torch.bfloat16)
        tensors[f"{prefix}.lora_B.weight"] = b.to(torch.bfloat16)
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "base_model_name_or_path": str(base),
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": list(LORA_TARGETS),
        "lora_dropout": 0.0,
        "bias": "none",
        "task_type": "CAUSAL_LM",
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": False,
    }
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))


def main() -> None:
    """Write base and fine-tunes."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", choices=sorted(SIZES), default="0.5b")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--fine-tunes", type=int, default=3)
    parser.add_argument("--shards", type=int, default=3)
    parser.add_argument(
        "--sparsity",
        type=float,
        default=0.0,
        help="fraction of entries a fine-tune leaves unchanged",
    )
    parser.add_argument("--adapters", type=int, default=0, help="LoRA adapters of the base")
    parser.add_argument("--rank", type=int, default=64, help="the adapters' LoRA rank")
    parser.add_argument("--only-adapters", action="store_true", help="add adapters only")
    args = parser.parse_args()
    config, layout = shapes(args.size)
    for k in range(1, args.adapters + 1):
        save_adapter(args.out / f"lora{k}", (args.out / "base").resolve(), layout, k, args.rank)
        print(f"wrote {args.out / f'lora{k}'}")
    if args.only_adapters:
        return
    save_sharded(args.out / "base", config, layout, base_tensor, args.shards)
    for k in range(1, args.fine_tunes + 1):

        def tuned(name: str, shape: tuple[int, ...], k: int = k) -> torch.Tensor:
            return base_tensor(name, shape) + task_vector(name, shape, k, args.sparsity)

        save_sharded(args.out / f"ft{k}", config, layout, tuned, args.shards)
        print(f"wrote {args.out / f'ft{k}'}")
    (args.out / "family.json").write_text(
        json.dumps({"size": args.size, "sparsity": args.sparsity, "fine_tunes": args.fine_tunes})
    )


if __name__ == "__main__":
    main()
