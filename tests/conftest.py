"""Shared fixtures: hermetic environment and tiny real checkpoints built in the session."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from typer.testing import CliRunner

from mergecli.cli import app

VOCAB = ["<unk>", "<s>", "</s>", *[chr(c) for c in range(ord("a"), ord("z") + 1)], " ", ".", ","]


@pytest.fixture(autouse=True)
def hermetic(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """No network, an empty private Hub cache, no token."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path_factory.getbasetemp() / "hf-cache"))
    monkeypatch.delenv("HF_TOKEN", raising=False)


def make_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level WordLevel tokenizer (real `tokenizer.json`)."""
    vocab = {tok: i for i, tok in enumerate(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def llama_config(layers: int = 3, vocab: int = len(VOCAB), hidden: int = 32) -> LlamaConfig:
    """A tiny Llama config."""
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )


def save_model(
    folder: Path, config: LlamaConfig, seed: int, dtype: torch.dtype = torch.float32
) -> Path:
    """Build a Llama with seeded weights and save it with its tokenizer."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    model.to(dtype).save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """base, a, b: three 3-layer float32 Llamas; deep: a 5-layer one; wide: other hidden size."""
    root = tmp_path_factory.mktemp("family")
    out = {
        name: save_model(root / name, llama_config(), seed)
        for seed, name in enumerate(["base", "a", "b"])
    }
    out["deep"] = save_model(root / "deep", llama_config(layers=5), 7)
    out["wide"] = save_model(root / "wide", llama_config(hidden=48), 8)
    out["bf16"] = save_model(root / "bf16", llama_config(), 9, torch.bfloat16)
    return out


@pytest.fixture
def runner() -> CliRunner:
    """Typer's test runner."""
    return CliRunner()


def invoke(runner: CliRunner, *args: str) -> tuple[int, str, str]:
    """Run the CLI in-process; return (exit code, stdout, stderr)."""
    result = runner.invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def run_subprocess(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run `python -m mergecli ARGS` offline, with extra environment variables."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **env}
    command = [sys.executable, "-m", "mergecli", *args]
    return subprocess.run(command, capture_output=True, text=True, env=full_env, check=False)


def write(path: Path, text: str) -> Path:
    """Write a recipe file."""
    path.write_text(text, encoding="utf-8")
    return path


def hub_cache_model(
    cache: Path, repo_id: str, source: Path, commit: str, refs: tuple[str, ...] = ("main",)
) -> None:
    """Lay out `source`'s files as a Hub cache snapshot (models--org--name/snapshots/<commit>)."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(source, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)


def assert_blocks_identical(plan: Any, text: str, tmp_path: Path) -> None:
    """Run `plan` on whole tensors and in 100-entry row blocks: the files must be equal."""
    from mergecli.engine.run import run_plan

    whole = run_plan(plan, tmp_path / "whole", text, reproducible=True, block_elements=1 << 30)
    blocks = run_plan(plan, tmp_path / "blocks", text, reproducible=True, block_elements=100)
    assert whole.files == blocks.files
    for name in whole.files:
        assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "blocks" / name).read_bytes()


def read_json(path: Path) -> dict[str, object]:
    """Load a JSON file."""
    data = json.loads(path.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


@pytest.fixture
def chdir_tmp(tmp_path: Path) -> Iterator[Path]:
    """Run a test inside its tmp folder."""
    old = Path.cwd()
    os.chdir(tmp_path)
    try:
        yield tmp_path
    finally:
        os.chdir(old)


def sparse_tune(base: Path, out: Path, seed: int, keep: float, clean_rows: int = 0) -> Path:
    """`base` plus a task vector with a `keep` fraction of nonzero entries; the first
    `clean_rows` rows of the embedding left unchanged (a misleading first block)."""
    shutil.copytree(base, out)
    generator = torch.Generator().manual_seed(seed)
    tensors = load_file(out / "model.safetensors")
    for name, tensor in tensors.items():
        mask = torch.rand(tensor.shape, generator=generator) < keep
        delta = torch.randn(tensor.shape, generator=generator) * 0.01 * mask
        if name == "model.embed_tokens.weight":
            delta[:clean_rows] = 0
        tensors[name] = tensor + delta
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out
