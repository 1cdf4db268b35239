"""Tied embeddings: the documented rule for tied, untied and mixed inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from conftest import invoke, llama_config, save_model, write

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


@pytest.fixture(scope="module")
def tied_family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """t1, t2: tied Llamas (no lm_head in the file); u: untied; dup: tied, head stored too."""
    root = tmp_path_factory.mktemp("tied")
    tied = llama_config()
    tied.tie_word_embeddings = True
    out = {
        "t1": save_model(root / "t1", tied, 11),
        "t2": save_model(root / "t2", tied, 12),
        "u": save_model(root / "u", llama_config(), 13),
    }
    dup = save_model(root / "dup", tied, 14)
    state = load_file(str(dup / "model.safetensors"))
    state[HEAD] = state[EMBED].clone()
    save_file(state, str(dup / "model.safetensors"), metadata={"format": "pt"})
    out["dup"] = dup
    return out


def state(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def linear(runner: CliRunner, tmp_path: Path, first: Path, second: Path) -> Path:
    text = (
        "merge_method: linear\nmodels:\n"
        f"  - model: {first}\n    parameters: {{weight: 0.25}}\n"
        f"  - model: {second}\n    parameters: {{weight: 0.75}}\n"
    )
    out = tmp_path / "out"
    code, _, err = invoke(runner, "run", str(write(tmp_path / "r.yaml", text)), "-o", str(out))
    assert code == 0, err
    return out


def logits(folder: Path) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(torch.tensor([[1, 4, 9, 16, 25]])).logits  # type: ignore[no-any-return]


def test_tied_with_untied_gives_untied_output_merging_effective_heads(
    tied_family: dict[str, Path], tmp_path: Path, runner: CliRunner
) -> None:
    out = linear(runner, tmp_path, tied_family["t1"], tied_family["u"])
    t1, u, merged = state(tied_family["t1"]), state(tied_family["u"]), state(out)
    assert HEAD not in t1
    expected_head = 0.25 * t1[EMBED].double() + 0.75 * u[HEAD].double()
    assert (merged[HEAD].double() - expected_head).abs().max() < 1e-6
    expected_embed = 0.25 * t1[EMBED].double() + 0.75 * u[EMBED].double()
    assert (merged[EMBED].double() - expected_embed).abs().max() < 1e-6
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    model = AutoModelForCausalLM.from_pretrained(out)
    assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    assert torch.equal(model.lm_head.weight, merged[HEAD])


def test_untied_template_with_tied_model_is_the_same_rule(
    tied_family: dict[str, Path], tmp_path: Path, runner: CliRunner
) -> None:
    out = linear(runner, tmp_path, tied_family["u"], tied_family["t2"])
    t2, u, merged = state(tied_family["t2"]), state(tied_family["u"]), state(out)
    expected_head = 0.25 * u[HEAD].double() + 0.75 * t2[EMBED].double()
    assert (merged[HEAD].double() - expected_head).abs().max() < 1e-6
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False


def test_all_tied_stays_tied_and_writes_the_shared_matrix_once(
    tied_family: dict[str, Path], tmp_path: Path, runner: CliRunner
) -> None:
    out = linear(runner, tmp_path, tied_family["dup"], tied_family["t2"])
    merged = state(out)
    assert HEAD not in merged
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert HEAD not in index["weight_map"]
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    dup, t2 = state(tied_family["dup"]), state(tied_family["t2"])
    expected = 0.25 * dup[EMBED].double() + 0.75 * t2[EMBED].double()
    assert (merged[EMBED].double() - expected).abs().max() < 1e-6
    model = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(model.lm_head.weight, merged[EMBED])


def test_task_vector_methods_use_the_tied_base_embedding_as_its_head(
    tied_family: dict[str, Path], tmp_path: Path, runner: CliRunner
) -> None:
    text = (
        f"merge_method: task_arithmetic\nbase_model: {tied_family['t1']}\nmodels:\n"
        f"  - model: {tied_family['u']}\n    parameters: {{weight: 0.5}}\n"
        f"  - model: {tied_family['t2']}\n    parameters: {{weight: 0.5}}\n"
    )
    out = tmp_path / "out"
    code, _, err = invoke(runner, "run", str(write(tmp_path / "r.yaml", text)), "-o", str(out))
    assert code == 0, err
    base, u, t2, merged = (
        state(p) for p in (tied_family["t1"], tied_family["u"], tied_family["t2"], out)
    )
    b = base[EMBED].double()
    expected = b + 0.5 * (u[HEAD].double() - b) + 0.5 * (t2[EMBED].double() - b)
    assert (merged[HEAD].double() - expected).abs().max() < 1e-6
    assert torch.isfinite(logits(out)).all()
