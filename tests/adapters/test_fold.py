"""LoRA adapters folded into their base on read, against PEFT's `merge_and_unload`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft_adapters import GPT2, LLAMA, lora_family, merged_reference
from safetensors.torch import load_file
from transformers import GPT2LMHeadModel, LlamaForCausalLM

from conftest import assert_blocks_identical, hub_cache_model, invoke, write
from mergecli.cli._common import plan_recipe
from mergecli.engine.run import run_plan
from mergecli.io.reader import TensorReader

__all__ = ["lora_family"]
TOKENS = torch.tensor([[1, 5, 9, 3, 7, 2, 11, 4]])


def one_model(adapter: str) -> str:
    return f"merge_method: linear\nmodels:\n  - model: {adapter}\n    parameters: {{weight: 1}}\n"


def output_tensors(folder: Path) -> dict[str, torch.Tensor]:
    index = folder / "model.safetensors.index.json"
    files = (
        set(json.loads(index.read_text())["weight_map"].values())
        if index.exists()
        else {"model.safetensors"}
    )
    return {k: v for f in sorted(files) for k, v in load_file(folder / f).items()}


@pytest.mark.parametrize("name", [*LLAMA, *GPT2, "bin"])
def test_folding_equals_peft_merge_and_unload(
    lora_family: dict[str, Path], runner, tmp_path: Path, name: str
) -> None:
    gpt2 = name in GPT2
    base = lora_family["gpt2" if gpt2 else "base"]
    recipe = write(tmp_path / "r.yaml", one_model(f"{base}+{lora_family[name]}"))
    code, _, err = invoke(runner, "run", str(recipe), "-o", str(tmp_path / "out"))
    assert code == 0, err
    reference = merged_reference(base, lora_family[name], gpt2).eval()
    expected = reference.state_dict()
    got = output_tensors(tmp_path / "out")
    plain = output_tensors(base)
    changed = [k for k in got if not torch.equal(got[k], plain[k])]
    assert changed, "the adapter changed nothing"
    for key, tensor in got.items():
        torch.testing.assert_close(tensor, expected[key], rtol=1e-6, atol=1e-6, msg=key)
    loaded = (
        (GPT2LMHeadModel if gpt2 else LlamaForCausalLM).from_pretrained(tmp_path / "out").eval()
    )
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(TOKENS).logits, reference(TOKENS).logits, rtol=1e-5, atol=1e-5
        )


def test_each_changed_tensor_is_one_the_adapter_names(lora_family: dict[str, Path]) -> None:
    """The rank pattern's modules get their own rank and alpha: q_proj rank 2 (alpha 8),
    layer 1's v_proj rank 6, down_proj alpha 3 (rank 4)."""
    plan = plan_recipe(
        write(
            lora_family["patterns"].parent / "p.yaml",
            one_model(f"{lora_family['base']}+{lora_family['patterns']}"),
        )
    )
    folds = {n: t.fold for n, t in plan.models[0].tensors.items() if t.fold is not None}
    assert sorted(folds) == sorted(
        f"model.layers.{i}.{m}.weight"
        for i in range(3)
        for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")
    )
    assert folds["model.layers.0.self_attn.q_proj.weight"].scale == 8 / 2
    assert folds["model.layers.1.self_attn.v_proj.weight"].scale == 8 / 6
    assert folds["model.layers.0.self_attn.v_proj.weight"].scale == 8 / 4
    assert folds["model.layers.2.mlp.down_proj.weight"].scale == 3 / 4


def test_an_adapter_alone_folds_into_the_recipe_base_or_the_one_it_names(
    lora_family: dict[str, Path], runner, tmp_path: Path
) -> None:
    adapter = lora_family["plain"]
    expected = merged_reference(lora_family["base"], adapter).state_dict()
    for i, text in enumerate(
        [
            one_model(str(adapter)),
            f"base_model: {lora_family['base']}\n"
            + one_model(str(adapter)).replace("linear", "task_arithmetic"),
        ]
    ):
        code, _, err = invoke(
            runner,
            "run",
            str(write(tmp_path / f"r{i}.yaml", text)),
            "-o",
            str(tmp_path / f"out{i}"),
        )
        assert code == 0, err
        for key, tensor in output_tensors(tmp_path / f"out{i}").items():
            torch.testing.assert_close(tensor, expected[key], rtol=1e-6, atol=1e-6)


def test_blocks_fold_byte_identical_to_whole_tensors(
    lora_family: dict[str, Path], tmp_path: Path
) -> None:
    base = lora_family["base"]
    text = (
        f"merge_method: ties\nbase_model: {base}\nparameters: {{density: 0.5}}\nmodels:\n"
        + "".join(
            f"  - model: {base}+{lora_family[n]}\n    parameters: {{weight: 0.6}}\n"
            for n in ("dora", "embedding", "dora_embedding", "modules_to_save")
        )
    )
    assert_blocks_identical(plan_recipe(write(tmp_path / "r.yaml", text)), text, tmp_path)


def test_the_base_is_read_once_for_all_its_adapters(
    lora_family: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = lora_family["base"]
    text = (
        f"merge_method: linear\nmodels:\n  - model: {base}\n    parameters: {{weight: 1}}\n"
        + "".join(
            f"  - model: {base}+{lora_family[f'tune{i}']}\n    parameters: {{weight: 1}}\n"
            for i in range(3)
        )
    )
    reads: list[tuple[str, str]] = []
    original = TensorReader._read_stored

    def counting(self, model, info, rows):  # type: ignore[no-untyped-def]
        reads.append((model.source.label, info.name))
        return original(self, model, info, rows)

    monkeypatch.setattr(TensorReader, "_read_stored", counting)
    plan = plan_recipe(write(tmp_path / "r.yaml", text))
    run_plan(plan, tmp_path / "out", text, reproducible=True)
    base_reads = [name for label, name in reads if label == str(base)]
    assert sorted(base_reads) == sorted(plan.models[0].tensors)  # each once
    expected = [merged_reference(base, lora_family[f"tune{i}"]).state_dict() for i in range(3)]
    plain = output_tensors(base)
    got = output_tensors(tmp_path / "out")
    for key in got:
        mean = (plain[key] + sum(e[key] for e in expected)) / 4
        torch.testing.assert_close(got[key], mean, rtol=1e-6, atol=1e-6)


def changed_copy(adapter: Path, out: Path, **settings: object) -> Path:
    """A copy of `adapter` with `settings` changed in its adapter_config.json."""
    out.mkdir()
    config = json.loads((adapter / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**config, **settings}))
    shutil.copyfile(adapter / "adapter_model.safetensors", out / "adapter_model.safetensors")
    return out


def _fails(runner, tmp_path: Path, text: str) -> tuple[int, str]:
    code, _, err = invoke(
        runner, "run", str(write(tmp_path / "r.yaml", text)), "-o", str(tmp_path / "out")
    )
    assert not (tmp_path / "out" / "model.safetensors").exists()
    return code, " ".join(err.split())


def test_other_peft_methods_are_refused_by_name(
    lora_family: dict[str, Path], runner, tmp_path: Path
) -> None:
    code, err = _fails(runner, tmp_path, one_model(f"{lora_family['base']}+{lora_family['ia3']}"))
    assert code == 4
    assert "is a PEFT IA3 adapter; mergecli folds LoRA adapters (plain, rsLoRA, DoRA) only" in err
    assert "models[0].model" in err


def test_an_unknown_adapter_setting_is_refused(
    lora_family: dict[str, Path], runner, tmp_path: Path
) -> None:
    copy = changed_copy(lora_family["plain"], tmp_path / "odd", use_bdlora={"blocks": 4})
    code, err = _fails(runner, tmp_path, one_model(f"{lora_family['base']}+{copy}"))
    assert code == 4
    assert "adapter setting `use_bdlora: {'blocks': 4}` is not supported" in err


def test_a_base_the_adapter_was_not_trained_on_is_refused(
    lora_family: dict[str, Path], runner, tmp_path: Path
) -> None:
    code, err = _fails(
        runner, tmp_path, one_model(f"{lora_family['other']}+{lora_family['plain']}")
    )
    assert code == 4
    assert (
        f"was trained on `{lora_family['base']}`, but the recipe folds it into `{lora_family['other']}`"
        in err
    )
    code, err = _fails(
        runner,
        tmp_path,
        f"base_model: {lora_family['other']}\n"
        + one_model(str(lora_family["plain"])).replace("linear", "task_arithmetic"),
    )
    assert code == 4 and "but the recipe folds it into" in err


def test_shapes_that_do_not_fit_are_refused_before_reading_weights(
    lora_family: dict[str, Path], runner, tmp_path: Path
) -> None:
    copy = changed_copy(lora_family["plain"], tmp_path / "nameless", base_model_name_or_path=None)
    code, err = _fails(runner, tmp_path, one_model(f"{lora_family['wide']}+{copy}"))
    assert code == 4
    assert (
        "a LoRA update of shape [32, 32] does not fit `model.layers.0.self_attn.q_proj.weight` of shape [48, 48]"
        in err
    )
    code, err = _fails(runner, tmp_path, one_model(str(copy)))
    assert code == 3 and "the adapter names no base model" in err


def test_a_plus_that_names_no_adapter_is_refused(
    lora_family: dict[str, Path], runner, tmp_path: Path
) -> None:
    code, err = _fails(runner, tmp_path, one_model(f"{lora_family['base']}+{lora_family['other']}"))
    assert code == 3
    assert "not a PEFT adapter (no adapter_config.json beside its weights)" in err


def test_a_lora_on_a_tied_head_is_refused(
    lora_family: dict[str, Path], runner, tmp_path: Path
) -> None:
    from peft_adapters import make_adapter

    adapter = make_adapter(
        lora_family["gpt2"],
        tmp_path / "head",
        {"r": 2, "target_modules": ["lm_head"]},
        5,
        gpt2=True,
    )
    code, err = _fails(runner, tmp_path, one_model(f"{lora_family['gpt2']}+{adapter}"))
    assert code == 4
    assert "changes `lm_head.weight`" in err and "ties its LM head" in err


def test_validate_and_plan_show_what_each_adapter_folds(
    lora_family: dict[str, Path], runner, tmp_path: Path
) -> None:
    base = lora_family["base"]
    text = (
        f"merge_method: linear\nmodels:\n  - model: {base}+{lora_family['dora']}\n"
        f"    parameters: {{weight: 1}}\n  - model: {base}+{lora_family['modules_to_save']}\n"
        "    parameters: {weight: 1}\n"
    )
    recipe = write(tmp_path / "r.yaml", text)
    code, out, _ = invoke(runner, "validate", str(recipe))
    assert code == 0
    assert f"  {base}+{lora_family['dora']}: LoRA folded into 9 tensors (rank 4; 9 DoRA)\n" in out
    assert (
        f"  {base}+{lora_family['modules_to_save']}: LoRA folded into 3 tensors (rank 4), 3 replaced (modules_to_save)\n"
        in out
    )
    code, out, _ = invoke(runner, "plan", str(recipe), "--json")
    data = json.loads(out)
    rows = {t["name"]: t["inputs"] for t in data["tensors"]}
    q = rows["model.layers.0.self_attn.q_proj.weight"]
    assert q[0]["fold"] == {
        "adapter": str(lora_family["dora"]),
        "kind": "dora",
        "rank": 4,
        "scale": 2.0,
    }
    assert q[1]["fold"] is None
    norm = rows["model.layers.2.input_layernorm.weight"][1]["fold"]
    assert norm == {
        "adapter": str(lora_family["modules_to_save"]),
        "kind": "replace",
        "tensor": "base_model.model.model.layers.2.input_layernorm.weight",
    }
    plain = sum(t.nbytes for t in plan_recipe(recipe).models[0].tensors.values())
    adapters = sum(
        (folder / "adapter_model.safetensors").stat().st_size
        for folder in (lora_family["dora"], lora_family["modules_to_save"])
    )
    # the base once, plus each adapter's tensors (less their headers)
    assert plain < data["bytes_to_read"] < plain + adapters


def test_hub_base_and_adapter_at_pinned_revisions(
    lora_family: dict[str, Path], runner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    hub_cache_model(cache, "org/base", lora_family["base"], "a" * 40)
    hub_cache_model(cache, "org/lora", lora_family["plain"], "b" * 40, refs=("v1",))
    recipe = write(tmp_path / "r.yaml", one_model("org/base@main+org/lora@v1"))
    code, _, err = invoke(runner, "run", str(recipe), "-o", str(tmp_path / "out"))
    assert code == 0, err
    expected = merged_reference(lora_family["base"], lora_family["plain"]).state_dict()
    for key, tensor in output_tensors(tmp_path / "out").items():
        torch.testing.assert_close(tensor, expected[key], rtol=1e-6, atol=1e-6)
    code, _, err = invoke(
        runner, "validate", str(write(tmp_path / "r2.yaml", one_model("org/base+org/lora")))
    )
    assert code == 3 and "org/lora: not in the local cache" in " ".join(err.split())


def test_damaged_adapter_folders_are_refused_as_files(
    lora_family: dict[str, Path], runner, tmp_path: Path
) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text('{"peft_type": "LORA", "r": ')
    shutil.copyfile(
        lora_family["plain"] / "adapter_model.safetensors", broken / "adapter_model.safetensors"
    )
    code, err = _fails(runner, tmp_path, one_model(f"{lora_family['base']}+{broken}"))
    assert code == 3 and "adapter_config.json" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copyfile(lora_family["plain"] / "adapter_config.json", empty / "adapter_config.json")
    code, err = _fails(runner, tmp_path, one_model(f"{lora_family['base']}+{empty}"))
    assert (
        code == 3
        and "has adapter_config.json but no adapter_model.safetensors or adapter_model.bin" in err
    )
    bad_rank = changed_copy(lora_family["plain"], tmp_path / "rank", r=3)
    code, err = _fails(runner, tmp_path, one_model(f"{lora_family['base']}+{bad_rank}"))
    assert code == 3 and "which do not form a rank-3 update" in err
    truncated = changed_copy(lora_family["plain"], tmp_path / "short")
    data = (truncated / "adapter_model.safetensors").read_bytes()
    (truncated / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    code, err = _fails(runner, tmp_path, one_model(f"{lora_family['base']}+{truncated}"))
    assert code == 3
