"""`output: {kind: adapter, combination: ...}` against PEFT's `add_weighted_adapter`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from peft_adapters import lora_family
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

from conftest import invoke, write

__all__ = ["lora_family"]
WEIGHTS = (0.6, -0.3, 0.5)


def recipe(family: dict[str, Path], names: list[str], output: str) -> str:
    models = "".join(
        f"  - model: {family[n]}\n    parameters: {{weight: {w}}}\n" for n, w in zip(names, WEIGHTS)
    )
    return f"merge_method: task_arithmetic\nbase_model: {family['base']}\nmodels:\n{models}output: {output}\n"


def peft_merged(
    family: dict[str, Path], names: list[str], **options: object
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """PEFT's merged adapter: module -> (A, B)."""
    model = PeftModel.from_pretrained(
        LlamaForCausalLM.from_pretrained(family["base"]), family[names[0]], adapter_name="m0"
    )
    for i, name in enumerate(names[1:], 1):
        model.load_adapter(family[name], adapter_name=f"m{i}")
    model.add_weighted_adapter(
        [f"m{i}" for i in range(len(names))], list(WEIGHTS[: len(names)]), "merged", **options
    )
    state = {k: v for k, v in model.state_dict().items() if ".merged" in k}
    out = {}
    for key, a in state.items():
        if "lora_A.merged" in key:
            module = key.removeprefix("base_model.model.").split(".lora_A")[0]
            out[module] = (a, state[key.replace("lora_A", "lora_B")])
    return out


def ours(folder: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    stored = load_file(folder / "adapter_model.safetensors")
    return {
        k.removeprefix("base_model.model.").removesuffix(".lora_A.weight"): (
            v,
            stored[k.replace("lora_A", "lora_B")],
        )
        for k, v in stored.items()
        if k.endswith("lora_A.weight")
    }


CASES = [
    ("linear", "{kind: adapter, combination: linear}", {}),
    ("cat", "{kind: adapter, combination: cat}", {}),
    ("svd", "{kind: adapter, combination: svd, svd_rank: 6}", {"svd_rank": 6}),
    ("ties", "{kind: adapter, combination: ties, density: 0.5}", {"density": 0.5}),
    (
        "ties",
        "{kind: adapter, combination: ties, density: 0.5, majority_sign_method: frequency}",
        {"density": 0.5, "majority_sign_method": "frequency"},
    ),
    ("ties_svd", "{kind: adapter, combination: ties_svd, density: 0.4}", {"density": 0.4}),
    (
        "magnitude_prune",
        "{kind: adapter, combination: magnitude_prune, density: 0.3}",
        {"density": 0.3},
    ),
    (
        "magnitude_prune_svd",
        "{kind: adapter, combination: magnitude_prune_svd, density: 0.3, svd_rank: 3}",
        {"density": 0.3, "svd_rank": 3},
    ),
]


@pytest.mark.parametrize(("combination", "output", "options"), CASES)
def test_adapter_merges_equal_peft_add_weighted_adapter(
    lora_family: dict[str, Path],
    runner,
    tmp_path: Path,
    combination: str,
    output: str,
    options: dict[str, object],
) -> None:
    names = ["tune0", "tune1", "tune2"]
    out = tmp_path / "merged"
    code, _, err = invoke(
        runner,
        "run",
        str(write(tmp_path / "r.yaml", recipe(lora_family, names, output))),
        "-o",
        str(out),
    )
    assert code == 0, err
    expected = peft_merged(lora_family, names, combination_type=combination, **options)
    got = ours(out)
    assert sorted(got) == sorted(expected)
    for module, (a, b) in expected.items():
        if combination.endswith("svd"):  # the factors are unique up to signs and splits
            torch.testing.assert_close(got[module][1] @ got[module][0], b @ a, rtol=1e-4, atol=1e-6)
        else:
            torch.testing.assert_close(got[module][0], a, rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(got[module][1], b, rtol=1e-6, atol=1e-7)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == next(iter(expected.values()))[0].shape[0]
    merged = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(lora_family["base"]), out)
    assert merged is not None


def test_dare_keeps_each_entry_as_a_subset_sum_at_the_density(
    lora_family: dict[str, Path], runner, tmp_path: Path
) -> None:
    """DARE's draws are seeded, not PEFT's: each merged entry must be a sum of a subset of
    the adapters' weighted entries divided by the density, kept at about that rate."""
    names = ["tune0", "tune1"]
    out = tmp_path / "merged"
    text = recipe(lora_family, names, "{kind: adapter, combination: dare_linear, density: 0.5}")
    assert invoke(runner, "run", str(write(tmp_path / "r.yaml", text)), "-o", str(out))[0] == 0
    got = ours(out)
    stored = [ours(lora_family[n]) for n in names]  # the tunes: r 4, alpha 8, scale 2
    roots = [(abs(w) * 2) ** 0.5 * (1 if w >= 0 else -1) for w in WEIGHTS[:2]]
    hits = total = 0
    for module, (a, _) in got.items():
        parts = [root * tune[module][0] / 0.5 for root, tune in zip(roots, stored)]
        options = torch.stack([torch.zeros_like(parts[0]), parts[0], parts[1], parts[0] + parts[1]])
        close = (options - a).abs().min(0).values
        assert float(close.max()) < 1e-5, module
        hits += int(((a - parts[0] - parts[1]).abs() < 1e-6).sum())
        total += a.numel()
    assert abs(hits / total - 0.25) < 0.05  # both kept: density squared


def test_adapter_output_errors(lora_family: dict[str, Path], runner, tmp_path: Path) -> None:
    def fails(text: str) -> tuple[int, str]:
        code, _, err = invoke(
            runner, "run", str(write(tmp_path / "r.yaml", text)), "-o", str(tmp_path / "o")
        )
        assert not (tmp_path / "o").exists()
        return code, " ".join(err.split())

    code, err = fails(
        recipe(lora_family, ["tune0", "patterns"], "{kind: adapter, combination: linear}")
    )
    assert code == 4 and "the adapters must have one rank; found ranks [2, 4, 6]" in err
    code, err = fails(recipe(lora_family, ["tune0", "dora"], "{kind: adapter, combination: cat}"))
    assert code == 2 and "has DoRA, which PEFT's combinations do not merge" in err
    code, err = fails(recipe(lora_family, ["tune0"], "{kind: adapter, combination: ties}"))
    assert code == 2 and "output.density: combination `ties` needs a `density`" in err
    code, err = fails(recipe(lora_family, ["tune0"], "{kind: adapter}"))
    assert code == 2 and "give exactly one of `combination`" in err
    code, err = fails(
        recipe(lora_family, ["tune0"], "{kind: adapter, combination: linear}").replace(
            "merge_method: task_arithmetic", "merge_method: ties"
        )
    )
    assert code == 2 and "write `merge_method: task_arithmetic`" in err


def test_any_method_over_adapters_factored_back_to_rank_r(
    lora_family: dict[str, Path], runner, tmp_path: Path
) -> None:
    """TIES over three adapters, as an adapter: each tensor's update is the best rank-3
    approximation of (the full TIES merge - base), and its reported error is that of
    Eckart-Young."""
    names = ["tune0", "tune1", "tune2"]
    text = recipe(lora_family, names, "{kind: adapter, rank: 3}").replace(
        "merge_method: task_arithmetic", "merge_method: ties\nparameters: {density: 0.5}"
    )
    code, out, err = invoke(
        runner,
        "run",
        str(write(tmp_path / "a.yaml", text)),
        "-o",
        str(tmp_path / "adapter"),
        "--json",
    )
    assert code == 0, err
    report = {r["tensor"]: r for r in json.loads(out)["tensors"]}
    full = text.replace("output: {kind: adapter, rank: 3}\n", "")
    assert (
        invoke(runner, "run", str(write(tmp_path / "f.yaml", full)), "-o", str(tmp_path / "full"))[
            0
        ]
        == 0
    )
    merged, base = (
        load_file(tmp_path / "full" / "model.safetensors"),
        load_file(lora_family["base"] / "model.safetensors"),
    )
    adapter = PeftModel.from_pretrained(
        LlamaForCausalLM.from_pretrained(lora_family["base"]), tmp_path / "adapter"
    )
    folded = adapter.merge_and_unload().state_dict()
    changed = [n for n in merged if not torch.equal(merged[n], base[n])]
    assert sorted(changed) == sorted(report)
    for name in changed:
        delta = (merged[name] - base[name]).double()
        values = torch.linalg.svdvals(delta)
        best = float(values[3:].square().sum().sqrt() / values.square().sum().sqrt())
        assert report[name]["rank"] == 3
        assert report[name]["relative_error"] == pytest.approx(best, rel=1e-4, abs=1e-7)
        achieved = float((merged[name] - folded[name]).double().norm() / delta.norm())
        assert achieved == pytest.approx(best, rel=1e-3, abs=1e-6)
