"""`mergecli extract-lora` against Eckart-Young and PEFT."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import GPT2Config, GPT2LMHeadModel, LlamaForCausalLM

from conftest import invoke
from mergecli.lora.factor import factor

TOKENS = torch.tensor([[1, 5, 9, 3, 7, 2, 11, 4]])


def extract_cli(runner, tuned: str, base: str, out: str, *args: str) -> tuple[int, str, str]:  # type: ignore[no-untyped-def]
    """`mergecli extract-lora TUNED --base BASE -o OUT ARGS...`."""
    return invoke(runner, "extract-lora", tuned, "--base", base, "-o", out, *args)


def optimal_error(delta: torch.Tensor, rank: int) -> float:
    """Eckart-Young: the least relative error of any rank-`rank` approximation."""
    values = torch.linalg.svdvals(delta.double())
    return float(values[rank:].square().sum().sqrt() / values.square().sum().sqrt())


@pytest.fixture(scope="module")
def tuned(family: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The family's base with a full fine-tune's dense deltas: a rank-3 part plus noise on
    every matrix, the first layer's norm changed, the rest of the norms not."""
    out = tmp_path_factory.mktemp("tuned") / "tuned"
    model = LlamaForCausalLM.from_pretrained(family["base"])
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2:
                left = torch.randn(param.shape[0], 3, generator=generator)
                right = torch.randn(3, param.shape[1], generator=generator)
                param.add_(
                    0.01 * left @ right + 0.002 * torch.randn(param.shape, generator=generator)
                )
            elif name == "model.layers.0.input_layernorm.weight":
                param.add_(0.1)
    model.save_pretrained(out)
    return out


def weights_of(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in LlamaForCausalLM.from_pretrained(folder).state_dict().items()}


def test_rank_r_errors_are_the_optimal_ones_and_peft_loads_it(
    family: dict[str, Path], tuned: Path, runner, tmp_path: Path
) -> None:
    out = tmp_path / "lora"
    code, stdout, err = extract_cli(runner, str(tuned), str(family["base"]), str(out), "--rank", "4", "--json",
        "--embeddings", "--lm-head",
    )  # fmt: skip
    assert code == 0, err
    report = {m["module"]: m for m in json.loads(stdout)["modules"]}
    base, target = weights_of(family["base"]), weights_of(tuned)
    merged = PeftModel.from_pretrained(
        LlamaForCausalLM.from_pretrained(family["base"]), out
    ).merge_and_unload()
    got = merged.state_dict()
    for name in target:
        delta = target[name] - base[name]
        module = name.removesuffix(".weight")
        if delta.dim() == 2:
            best = optimal_error(delta, 4)
            achieved = float((target[name] - got[name]).double().norm() / delta.double().norm())
            assert achieved <= best * 1.01, name
            assert report[module]["relative_error"] == pytest.approx(best, rel=1e-6)
            assert report[module]["rank"] == 4 and report[module]["action"] == "lora"
    assert report["model.layers.0.input_layernorm"]["action"] == "modules_to_save"
    assert torch.equal(
        got["model.layers.0.input_layernorm.weight"],
        target["model.layers.0.input_layernorm.weight"],
    )
    assert "model.layers.1.input_layernorm" not in report  # unchanged
    with torch.no_grad():
        want = LlamaForCausalLM.from_pretrained(tuned)(TOKENS).logits
        near = (merged(TOKENS).logits - want).norm()
        far = (LlamaForCausalLM.from_pretrained(family["base"])(TOKENS).logits - want).norm()
    assert near < 0.5 * far


def test_full_rank_with_embeddings_and_head_reproduces_the_fine_tune(
    family: dict[str, Path], tuned: Path, runner, tmp_path: Path
) -> None:
    out = tmp_path / "lora"
    code, _, err = extract_cli(runner, str(tuned), str(family["base"]), str(out),
        "--rank", "64", "--embeddings", "--lm-head", "--quiet",
    )  # fmt: skip
    assert code == 0, err
    stored = load_file(out / "adapter_model.safetensors")
    assert stored["base_model.model.model.embed_tokens.lora_embedding_A"].shape == (32, 32)
    assert stored["base_model.model.model.embed_tokens.lora_embedding_B"].shape == (32, 32)
    merged = PeftModel.from_pretrained(
        LlamaForCausalLM.from_pretrained(family["base"]), out
    ).merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(
            merged(TOKENS).logits,
            LlamaForCausalLM.from_pretrained(tuned)(TOKENS).logits,
            rtol=1e-4,
            atol=1e-4,
        )


def test_energy_picks_the_smallest_rank_keeping_it(
    family: dict[str, Path], tuned: Path, runner, tmp_path: Path
) -> None:
    out = tmp_path / "lora"
    code, stdout, err = extract_cli(
        runner,
        str(tuned),
        str(family["base"]),
        str(out),
        "--energy",
        "0.9",
        "--json",
    )
    assert code == 0, err
    report = {m["module"]: m for m in json.loads(stdout)["modules"]}
    base, target = weights_of(family["base"]), weights_of(tuned)
    config = json.loads((out / "adapter_config.json").read_text())
    assert report["model.embed_tokens"]["action"] == report["lm_head"]["action"] == "left out"
    assert report["lm_head"]["note"] == "changed; the LM head (--lm-head to extract it)"
    for module, row in report.items():
        if row["action"] != "lora":
            continue
        delta = (target[f"{module}.weight"] - base[f"{module}.weight"]).double()
        values = torch.linalg.svdvals(delta).square()
        kept = torch.cumsum(values, 0) / values.sum()
        assert row["rank"] == int((kept < 0.9).sum()) + 1, module
        assert config["rank_pattern"].get(module, config["r"]) == row["rank"]
        assert config["alpha_pattern"].get(module, config["lora_alpha"]) == row["rank"]
    merged = PeftModel.from_pretrained(
        LlamaForCausalLM.from_pretrained(family["base"]), out
    ).merge_and_unload()
    got = merged.state_dict()
    for module, row in report.items():
        if row["action"] == "lora":
            name = f"{module}.weight"
            error = float(
                (target[name] - got[name]).double().norm()
                / (target[name] - base[name]).double().norm()
            )
            assert error <= (0.1**0.5) * 1.001 and error == pytest.approx(
                row["relative_error"], rel=1e-3
            )


def test_gpt2_conv1d_and_a_changed_bias(tmp_path: Path, runner) -> None:
    config = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32)
    torch.manual_seed(3)
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "base")
    model = GPT2LMHeadModel.from_pretrained(tmp_path / "base")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("c_attn.weight", "c_fc.weight")):
                param.add_(0.01 * torch.randn_like(param))
        model.transformer.h[1].mlp.c_fc.bias.add_(0.05)
        model.transformer.h[1].ln_2.bias.add_(0.05)
    model.save_pretrained(tmp_path / "tuned")
    out = tmp_path / "lora"
    code, stdout, err = extract_cli(
        runner,
        str(tmp_path / "tuned"),
        str(tmp_path / "base"),
        str(out),
        "--rank",
        "3",
        "--json",
    )
    assert code == 0, err
    report = {m["module"]: m for m in json.loads(stdout)["modules"]}
    assert report["transformer.h.1.mlp.c_fc"]["action"] == "lora"
    assert report["transformer.h.1.mlp.c_fc"]["note"] == "bias changed: saved whole"
    assert report["transformer.h.1.ln_2"]["action"] == "modules_to_save"
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True and config["bias"] == "lora_only"
    merged = PeftModel.from_pretrained(
        GPT2LMHeadModel.from_pretrained(tmp_path / "base"), out
    ).merge_and_unload()
    got, base, target = (
        merged.state_dict(),
        GPT2LMHeadModel.from_pretrained(tmp_path / "base").state_dict(),
        model.state_dict(),
    )
    for name in ("transformer.h.0.attn.c_attn.weight", "transformer.h.0.mlp.c_fc.weight"):
        delta = target[name] - base[name]
        achieved = float((target[name] - got[name]).double().norm() / delta.double().norm())
        assert achieved <= optimal_error(delta, 3) * 1.01
    assert torch.equal(
        got["transformer.h.1.mlp.c_fc.bias"], target["transformer.h.1.mlp.c_fc.bias"]
    )


def test_randomized_svd_is_as_accurate_as_the_exact_one() -> None:
    generator = torch.Generator().manual_seed(0)
    # a fine-tune's spectrum: a decaying low-rank part and dense noise
    left, right = (
        torch.randn(600, 40, generator=generator),
        torch.randn(40, 300, generator=generator),
    )
    delta = (left * torch.logspace(0, -2, 40)) @ right * 0.01 + 0.0005 * torch.randn(
        600, 300, generator=generator
    )
    exact = factor(delta, rank=16, solver="exact")
    sketched = factor(delta, rank=16, solver="randomized")
    best = optimal_error(delta, 16)
    for found in (exact, sketched):
        achieved = float(
            (delta.double() - found.b.double() @ found.a.double()).norm() / delta.double().norm()
        )
        assert achieved <= best * 1.01 and found.error == pytest.approx(achieved, rel=1e-3)


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        ([], 2, "give exactly one of --rank and --energy"),
        (["--rank", "4", "--energy", "0.9"], 2, "give exactly one of --rank and --energy"),
        (["--energy", "1.5"], 2, "--energy 1.5 is out of range"),
        (["--rank", "4", "--include", "("], 2, "module pattern '(' is not a valid regex"),
        (["--rank", "4", "--svd", "fast"], 2, "--svd 'fast' is not a solver"),
    ],
)
def test_bad_options(
    family: dict[str, Path],
    tuned: Path,
    runner,
    tmp_path: Path,
    args: list[str],
    code: int,
    message: str,
) -> None:
    found, _, err = extract_cli(
        runner,
        str(tuned),
        str(family["base"]),
        str(tmp_path / "o"),
        *args,
    )
    assert found == code and message in " ".join(err.split())
    assert not (tmp_path / "o").exists()


def test_models_that_do_not_pair_are_refused(
    family: dict[str, Path], runner, tmp_path: Path
) -> None:
    code, _, err = extract_cli(
        runner,
        str(family["wide"]),
        str(family["base"]),
        str(tmp_path / "o"),
        "--rank",
        "2",
    )
    assert code == 4 and "has shape [32, 48] in" in " ".join(err.split())
    code, _, err = extract_cli(
        runner,
        str(family["base"]),
        str(family["base"]),
        str(tmp_path / "o"),
        "--rank",
        "2",
    )
    assert code == 2 and "have the same weights; there is nothing to extract" in " ".join(
        err.split()
    )
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


def test_mergecli_folds_its_extracted_adapter_as_peft_does(
    family: dict[str, Path], tuned: Path, runner, tmp_path: Path
) -> None:
    out = tmp_path / "lora"
    code, _, err = extract_cli(
        runner,
        str(tuned),
        str(family["base"]),
        str(out),
        "--energy",
        "0.8",
        "--quiet",
    )
    assert code == 0, err
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"merge_method: linear\nmodels:\n  - model: {family['base']}+{out}\n    parameters: {{weight: 1}}\n"
    )
    code, _, err = invoke(runner, "run", str(recipe), "-o", str(tmp_path / "folded"))
    assert code == 0, err
    expected = (
        PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(family["base"]), out)
        .merge_and_unload()
        .state_dict()
    )
    got = load_file(tmp_path / "folded" / "model.safetensors")
    for key, tensor in got.items():
        torch.testing.assert_close(tensor, expected[key], rtol=1e-6, atol=1e-6, msg=key)


def test_big_deltas_are_factored_from_row_chunks_to_the_same_update(
    family: dict[str, Path], tuned: Path, runner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mergecli.lora import extract
    from mergecli.lora import factor as factor_module

    def updates(folder: Path) -> dict[str, torch.Tensor]:
        stored = load_file(folder / "adapter_model.safetensors")
        return {
            "embed": (
                stored["base_model.model.model.embed_tokens.lora_embedding_B"]
                @ stored["base_model.model.model.embed_tokens.lora_embedding_A"]
            ).T,
            "head": stored["base_model.model.lm_head.lora_B.weight"]
            @ stored["base_model.model.lm_head.lora_A.weight"],
        }

    args = ["--base", str(family["base"]), "--rank", "3", "--embeddings", "--lm-head", "--quiet"]
    assert invoke(runner, "extract-lora", str(tuned), "-o", str(tmp_path / "held"), *args)[0] == 0
    monkeypatch.setattr(extract, "HELD_BYTES", 1000)  # the 32x32 embedding is 4 KB
    monkeypatch.setattr(extract, "CHUNK_BYTES", 256)
    monkeypatch.setattr(factor_module, "CHUNK_ROWS", 4)
    reads: list[tuple[int, int] | None] = []
    original = extract.TensorReader.read

    def counting(self, model, name, rows=None):  # type: ignore[no-untyped-def]
        if name == "model.embed_tokens.weight":
            reads.append(rows)
        return original(self, model, name, rows)

    monkeypatch.setattr(extract.TensorReader, "read", counting)
    assert (
        invoke(runner, "extract-lora", str(tuned), "-o", str(tmp_path / "chunked"), *args)[0] == 0
    )
    # compared 2 rows (256 B) at a time, factored 4 rows at a time, never read whole
    assert reads and None not in reads and {b - a for a, b in reads} == {2, 4}
    held, chunked = updates(tmp_path / "held"), updates(tmp_path / "chunked")
    for key in held:
        torch.testing.assert_close(chunked[key], held[key], rtol=1e-5, atol=1e-6)


def test_include_exclude_and_the_randomized_solver(
    family: dict[str, Path], tuned: Path, runner, tmp_path: Path
) -> None:
    code, stdout, err = extract_cli(
        runner, str(tuned), str(family["base"]), str(tmp_path / "o"), "--rank", "2",
        "--include", r"self_attn", "--exclude", r"layers\.1\.", "--svd", "randomized", "--json",
    )  # fmt: skip
    assert code == 0, err
    report = {m["module"]: m for m in json.loads(stdout)["modules"]}
    lora = sorted(m for m, r in report.items() if r["action"] == "lora")
    assert lora == sorted(
        f"model.layers.{i}.self_attn.{p}_proj" for i in (0, 2) for p in ("q", "k", "v", "o")
    )
    assert report["model.layers.1.self_attn.q_proj"]["note"] == "changed; matched by --exclude"
    assert report["model.layers.0.mlp.up_proj"]["note"] == "changed; not matched by --include"
    base, target = weights_of(family["base"]), weights_of(tuned)
    for module in lora:
        delta = target[f"{module}.weight"] - base[f"{module}.weight"]
        assert report[module]["relative_error"] <= optimal_error(delta, 2) * 1.01
    config = json.loads((tmp_path / "o" / "adapter_config.json").read_text())
    assert config["target_modules"] == lora
