"""Make a benchmark model family: a random base with real architecture shapes and N
"fine-tunes" (base plus sparse deltas), saved as sharded safetensors like Hub checkpoints.

    python benchmarks/make_family.py --size 0.5b --out benchmarks/_work/0.5b

Sizes: tiny (hidden 64), 0.5b (Qwen2-0.5B shapes, untied head: 630 M parameters, 1.26 GB
in bf16), 1.5b (Qwen2-1.5B shapes).
"""

from __future__ import annotations

import argparse
import json
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
    config = Qwen2Config(
        **SIZES[size],
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
        architectures=["Qwen2ForCausalLM"],
    )
    with torch.device("meta"):
        model = Qwen2ForCausalLM(config)
    return config, {name: tuple(t.shape) for name, t in model.state_dict().items()}


def save_sharded(
    folder: Path, config: Qwen2Config, tensors: dict[str, torch.Tensor], shards: int
) -> None:
    """Save as `shards` files with an index, the way save_pretrained lays them out."""
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    names = list(tensors)
    per = -(-len(names) // shards)
    weight_map = {}
    total = 0
    for i in range(shards):
        part = {n: tensors[n].contiguous() for n in names[i * per : (i + 1) * per]}
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file(part, str(folder / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
        total += sum(t.numel() * t.element_size() for t in part.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def main() -> None:
    """Write base and fine-tunes."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", choices=sorted(SIZES), default="0.5b")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--fine-tunes", type=int, default=3)
    parser.add_argument("--shards", type=int, default=3)
    args = parser.parse_args()
    config, layout = shapes(args.size)
    generator = torch.Generator().manual_seed(0)
    base = {
        n: (torch.randn(s, generator=generator) * 0.02).to(torch.bfloat16)
        for n, s in layout.items()
    }
    save_sharded(args.out / "base", config, base, args.shards)
    for k in range(args.fine_tunes):
        tuned = {}
        for name, tensor in base.items():
            keep = torch.rand(tensor.shape, generator=generator) < 0.1
            delta = torch.randn(tensor.shape, generator=generator) * 0.002 * keep
            tuned[name] = (tensor.float() + delta).to(torch.bfloat16)
        save_sharded(args.out / f"ft{k + 1}", config, tuned, args.shards)
        print(f"wrote {args.out / f'ft{k + 1}'}")


if __name__ == "__main__":
    main()
