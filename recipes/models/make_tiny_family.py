"""Regenerate the bundled tiny Llama family deterministically.

    python recipes/models/make_tiny_family.py

Writes `tiny-llama-base`, `tiny-llama-chat` and `tiny-llama-code` beside this file: a 4-layer
Llama (hidden 64, vocabulary 320) in bfloat16 with a byte-level BPE tokenizer trained on a
fixed corpus, and two "fine-tunes" that are the base plus small seeded perturbations.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

HERE = Path(__file__).resolve().parent
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Merging models averages their weights tensor by tensor.",
    "def add(a, b):\n    return a + b\n",
    "User: hello! Assistant: Hi, how can I help you today?",
    "Task vectors are the difference between a fine-tuned model and its base.",
    "for i in range(10):\n    print(i * i)\n",
] * 20
FINE_TUNES = {"tiny-llama-chat": 1, "tiny-llama-code": 2}


def make_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on the fixed corpus."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def make_base(vocab_size: int) -> LlamaForCausalLM:
    """The base model with seeded random weights."""
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=1,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def fine_tune(base: LlamaForCausalLM, seed: int) -> LlamaForCausalLM:
    """Base plus a seeded perturbation of 2% of each tensor's scale."""
    generator = torch.Generator().manual_seed(seed)
    model = LlamaForCausalLM(base.config).eval()
    state = {}
    for name, tensor in base.state_dict().items():
        noise = torch.randn(tensor.shape, generator=generator) * 0.02 * (tensor.float().std() + 1e-3)
        state[name] = tensor + noise
    model.load_state_dict(state)
    return model


def save(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, name: str) -> None:
    """Save in bfloat16 with the tokenizer."""
    folder = HERE / name
    shutil.rmtree(folder, ignore_errors=True)
    model.to(torch.bfloat16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def main() -> None:
    """Write the three models."""
    tokenizer = make_tokenizer()
    base = make_base(len(tokenizer))
    for name, seed in FINE_TUNES.items():
        save(fine_tune(base, seed), tokenizer, name)
    save(base, tokenizer, "tiny-llama-base")


if __name__ == "__main__":
    main()
