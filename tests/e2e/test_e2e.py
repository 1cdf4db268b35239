"""End to end: real tiny checkpoints in, `mergecli run` through the CLI, exact numbers out."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from conftest import hub_cache_model, invoke, read_json, run_subprocess, sparse_tune, write
from mergecli.cli._common import plan_recipe
from mergecli.engine.run import run_plan


def state(folder: Path) -> dict[str, torch.Tensor]:
    index = read_json(folder / "model.safetensors.index.json")
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(set(index["weight_map"].values())):  # type: ignore[union-attr]
        out.update(load_file(str(folder / shard)))
    return out


class Exact(dict[str, torch.Tensor]):
    """float64 results plus, per element, the magnitude sum_i |w_i W_i| / |sum w_i| of the terms."""

    scale: dict[str, torch.Tensor]


def linear64(folders: list[Path], weights: list[float]) -> Exact:
    """sum w_i W_i / sum w_i in float64, written here independently of mergecli."""
    states = [load_file(str(f / "model.safetensors")) for f in folders]
    total = sum(weights)
    out = Exact()
    out.scale = {}
    for name in states[0]:
        terms = [w * s[name].double() for w, s in zip(weights, states)]
        out[name] = torch.stack(terms).sum(0) / total
        out.scale[name] = torch.stack(terms).abs().sum(0) / abs(total)
    return out


def assert_float32_close(
    actual: torch.Tensor, expected64: torch.Tensor, scale: torch.Tensor | None = None
) -> None:
    """Within float32 rounding of the float64 result: n+2 roundings of terms of size `scale`."""
    assert actual.dtype == torch.float32
    scale = expected64.abs() if scale is None else scale
    tol = 6 * torch.finfo(torch.float32).eps * scale
    assert ((actual.double() - expected64).abs() <= tol).all()


def linear_recipe(family: dict[str, Path], extra: str = "") -> str:
    return (
        "merge_method: linear\nmodels:\n"
        f"  - model: {family['a']}\n    parameters: {{weight: 0.7}}\n"
        f"  - model: {family['b']}\n    parameters: {{weight: 0.2}}\n"
        f"  - model: {family['base']}\n    parameters: {{weight: 0.1}}\n" + extra
    )


def test_linear_matches_float64_math_and_loads(
    family: dict[str, Path], tmp_path: Path, runner: CliRunner
) -> None:
    recipe = write(tmp_path / "r.yaml", linear_recipe(family))
    code, _, err = invoke(runner, "run", str(recipe), "-o", str(tmp_path / "out"))
    assert code == 0, err
    out = tmp_path / "out"
    merged = state(out)
    expected = linear64([family["a"], family["b"], family["base"]], [0.7, 0.2, 0.1])
    assert set(merged) == set(expected)
    for name in expected:
        assert_float32_close(merged[name], expected[name], expected.scale[name])
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    reference = AutoModelForCausalLM.from_pretrained(family["a"]).eval()
    reference.load_state_dict({k: v.float() for k, v in expected.items()})
    ids = torch.tensor([[1, 5, 9, 12, 3, 7]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=1e-5)


def test_output_folder_layout_card_and_manifest(
    family: dict[str, Path], tmp_path: Path, runner: CliRunner
) -> None:
    text = linear_recipe(family, "name: my-soup\nlicense: mit\ntags: [chat]\ndtype: bfloat16\n")
    recipe = write(tmp_path / "r.yaml", text)
    code, _, err = invoke(runner, "run", str(recipe), "-o", str(tmp_path / "out"))
    assert code == 0, err
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "config.json",
        "generation_config.json",
        "mergecli_manifest.json",
        "mergecli_recipe.yaml",
        "model.safetensors",
        "model.safetensors.index.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert not (tmp_path / "out.partial").exists()
    assert (out / "mergecli_recipe.yaml").read_text() == text
    assert (out / "tokenizer.json").read_bytes() == (family["a"] / "tokenizer.json").read_bytes()
    config = read_json(out / "config.json")
    assert config["dtype"] == "bfloat16" and config["num_hidden_layers"] == 3
    assert all(t.dtype == torch.bfloat16 for t in state(out).values())
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front == {
        "base_model_relation": "merge",
        "library_name": "transformers",
        "tags": ["merge", "mergecli", "chat"],
        "license": "mit",
    }
    assert "# my-soup" in card
    assert "- Method: **linear**" in card and "https://arxiv.org/abs/2203.05482" in card
    assert f"| `{family['a']}` | local | input | weight: 0.7 |" in card
    assert "```yaml\n" + text.rstrip() + "\n```" in card
    manifest = read_json(out / "mergecli_manifest.json")
    import hashlib

    outputs = manifest["outputs"]
    assert isinstance(outputs, dict)
    for name, digest in outputs.items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest
    assert "mergecli_manifest.json" not in outputs and "README.md" in outputs


def test_sharding_and_index(family: dict[str, Path], tmp_path: Path, runner: CliRunner) -> None:
    recipe = write(tmp_path / "r.yaml", linear_recipe(family))
    code, _, err = invoke(
        runner, "run", str(recipe), "-o", str(tmp_path / "out"), "--shard-size", "20KB"
    )
    assert code == 0, err
    out = tmp_path / "out"
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    count = len(shards)
    assert count > 2
    assert shards == [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
    index = read_json(out / "model.safetensors.index.json")
    merged = state(out)
    assert index["metadata"] == {
        "total_size": sum(t.numel() * t.element_size() for t in merged.values())
    }
    # each shard stays under the limit unless it holds a single larger tensor
    for shard in shards:
        tensors = load_file(str(out / shard))
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        assert size <= 20_000 or len(tensors) == 1
    single = tmp_path / "single"
    assert invoke(runner, "run", str(recipe), "-o", str(single))[0] == 0
    assert state(single).keys() == merged.keys()
    assert all(torch.equal(state(single)[k], merged[k]) for k in merged)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 3


def test_passthrough_slices_renumber_layers(
    family: dict[str, Path], tmp_path: Path, runner: CliRunner
) -> None:
    recipe = write(
        tmp_path / "r.yaml",
        "merge_method: passthrough\nslices:\n"
        f"  - sources:\n      - model: {family['a']}\n        layer_range: [0, 2]\n"
        f"  - sources:\n      - model: {family['deep']}\n        layer_range: [1, 5]\n",
    )
    code, _, err = invoke(runner, "run", str(recipe), "-o", str(tmp_path / "out"))
    assert code == 0, err
    assert "layers: 3 in the base/first model -> 6 in the output" in err
    merged = state(tmp_path / "out")
    a = load_file(str(family["a"] / "model.safetensors"))
    deep = load_file(str(family["deep"] / "model.safetensors"))
    expected = {"model.embed_tokens.weight": a["model.embed_tokens.weight"]}
    for i in range(2):
        expected.update(
            {
                k.replace(f"layers.{i}.", f"layers.{i}.", 1): v
                for k, v in a.items()
                if f"layers.{i}." in k
            }
        )
    for out_i, in_i in zip(range(2, 6), range(1, 5)):
        expected.update(
            {
                k.replace(f"layers.{in_i}.", f"layers.{out_i}.", 1): v
                for k, v in deep.items()
                if f"layers.{in_i}." in k
            }
        )
    expected["model.norm.weight"] = deep["model.norm.weight"]
    expected["lm_head.weight"] = deep["lm_head.weight"]
    assert merged.keys() == expected.keys()
    assert all(torch.equal(merged[k], expected[k]) for k in expected)
    config = read_json(tmp_path / "out" / "config.json")
    assert config["num_hidden_layers"] == 6
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        assert model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 32)


def test_gradient_and_filter_weights_per_layer(
    family: dict[str, Path], tmp_path: Path, runner: CliRunner
) -> None:
    recipe = write(
        tmp_path / "r.yaml",
        "merge_method: linear\nmodels:\n"
        f"  - model: {family['a']}\n    parameters:\n      weight:\n        - filter: mlp\n          value: [1.0, 0.0]\n        - value: 1.0\n"
        f"  - model: {family['b']}\n    parameters: {{weight: 1.0}}\n",
    )
    code, _, err = invoke(runner, "run", str(recipe), "-o", str(tmp_path / "out"))
    assert code == 0, err
    merged = state(tmp_path / "out")
    a = load_file(str(family["a"] / "model.safetensors"))
    b = load_file(str(family["b"] / "model.safetensors"))
    # 3 layers: t = 0, 0.5, 1 -> weight of a on mlp = 1, 0.5, 0; elsewhere 1
    for layer, wa in enumerate([1.0, 0.5, 0.0]):
        name = f"model.layers.{layer}.mlp.up_proj.weight"
        expected = (wa * a[name].double() + b[name].double()) / (wa + 1.0)
        scale = (wa * a[name].double().abs() + b[name].double().abs()) / (wa + 1.0)
        assert_float32_close(merged[name], expected, scale)
        attn = f"model.layers.{layer}.self_attn.q_proj.weight"
        scale = (a[attn].double().abs() + b[attn].double().abs()) / 2
        assert_float32_close(merged[attn], (a[attn].double() + b[attn].double()) / 2, scale)


def test_plan_json_resolves_parameters(
    family: dict[str, Path], tmp_path: Path, runner: CliRunner
) -> None:
    recipe = write(
        tmp_path / "r.yaml",
        "merge_method: linear\nparameters: {weight: [0.0, 1.0]}\nmodels:\n"
        f"  - model: {family['a']}\n  - model: {family['b']}\n    parameters: {{weight: 2.0}}\n",
    )
    code, out, err = invoke(runner, "plan", str(recipe), "--json")
    assert code == 0, err
    data = json.loads(out)
    by_name = {t["name"]: t for t in data["tensors"]}
    assert by_name["model.embed_tokens.weight"]["t"] == 0.0
    assert by_name["model.embed_tokens.weight"]["per_model"] == [{"weight": 0.0}, {"weight": 2.0}]
    assert by_name["model.layers.1.mlp.up_proj.weight"]["per_model"] == [
        {"weight": 0.5},
        {"weight": 2.0},
    ]
    # after the layers, as before them, t = 0: mergekit 0.1.5 plans both with t = 0
    assert by_name["lm_head.weight"]["t"] == 0.0
    assert by_name["lm_head.weight"]["per_model"][0] == {"weight": 0.0}
    assert by_name["model.norm.weight"]["t"] == 0.0
    assert data["shards"] == ["model.safetensors"]
    sizes = sum(
        t.numel() * t.element_size()
        for t in load_file(str(family["a"] / "model.safetensors")).values()
    )
    assert data["bytes_to_write"] == sizes and data["bytes_to_read"] == 2 * sizes
    assert [t["name"] for t in data["tensors"]][:2] == [
        "model.embed_tokens.weight",
        "model.layers.0.input_layernorm.weight",
    ]


def test_subprocess_run_and_exit_codes(family: dict[str, Path], tmp_path: Path) -> None:
    recipe = write(tmp_path / "r.yaml", linear_recipe(family))
    args = ("run", str(recipe), "-o", str(tmp_path / "out"), "--json")
    done = run_subprocess(*args)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["status"] == "ok" and summary["tensors"] == 30
    assert (
        summary["files"]["model.safetensors"]
        == read_json(tmp_path / "out" / "mergecli_manifest.json")["outputs"]["model.safetensors"]
    )  # type: ignore[index]
    again = run_subprocess(*args)
    assert again.returncode == 5
    assert "already exists and is not empty" in again.stderr and "Traceback" not in again.stderr


@pytest.mark.parametrize(
    ("make", "code", "message"),
    [
        (
            lambda f: f"  - model: {f['a']}/nope\n    parameters: {{weight: 1}}\n",
            3,
            "local folder not found",
        ),
        (
            lambda f: f"  - model: {f['wide']}\n    parameters: {{weight: 1}}\n",
            4,
            "... and 27 more tensors of ",
        ),
        (
            lambda f: "  - model: nobody/missing-model\n    parameters: {weight: 1}\n",
            3,
            "nobody/missing-model: not in the local cache",
        ),
    ],
)
def test_model_problems_before_any_weight_is_read(
    family: dict[str, Path],
    tmp_path: Path,
    runner: CliRunner,
    make: object,
    code: int,
    message: str,
) -> None:
    text = (
        f"merge_method: linear\nmodels:\n  - model: {family['a']}\n    parameters: {{weight: 1}}\n"
        + make(family)
    )  # type: ignore[operator]
    recipe = write(tmp_path / "r.yaml", text)
    got, _, err = invoke(runner, "run", str(recipe), "-o", str(tmp_path / "out"))
    assert got == code
    assert message in err
    assert "  - models[1]" in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_layer_range_out_of_bounds(
    family: dict[str, Path], tmp_path: Path, runner: CliRunner
) -> None:
    recipe = write(
        tmp_path / "r.yaml",
        f"merge_method: passthrough\nslices:\n  - sources:\n      - model: {family['a']}\n        layer_range: [1, 4]\n",
    )
    code, _, err = invoke(runner, "validate", str(recipe))
    assert code == 2
    assert "slices[0].sources[0].layer_range: layer_range [1, 4] is out of bounds: " in err
    assert "has 3 layers (0..2)" in err and "the whole model is [0, 3]" in err


def test_validate_reports_all_recipes(
    family: dict[str, Path], tmp_path: Path, runner: CliRunner
) -> None:
    good = write(tmp_path / "good.yaml", linear_recipe(family))
    bad = write(tmp_path / "bad.yaml", "merge_method: lineer\nmodels:\n  - model: x/y\n")
    code, out, err = invoke(runner, "validate", str(good), str(bad))
    assert code == 2
    assert f"ok: {good} (linear, 3 models, 30 tensors)" in out
    assert "unknown merge method `lineer`" in err and "1 of 2 recipes invalid" in err


def test_hub_model_from_the_offline_cache(
    family: dict[str, Path], tmp_path: Path, runner: CliRunner
) -> None:
    cache = Path(os.environ["HF_HUB_CACHE"])
    commit = "0123456789abcdef0123456789abcdef01234567"
    hub_cache_model(cache, "org/tiny-a", family["a"], commit, refs=("main", "v1"))
    recipe = write(
        tmp_path / "r.yaml",
        f"merge_method: linear\nmodels:\n  - model: org/tiny-a@v1\n    parameters: {{weight: 1}}\n"
        f"  - model: {family['b']}\n    parameters: {{weight: 1}}\n",
    )
    code, _, err = invoke(runner, "run", str(recipe), "-o", str(tmp_path / "out"))
    assert code == 0, err
    expected = linear64([family["a"], family["b"]], [1.0, 1.0])
    merged = state(tmp_path / "out")
    for name in expected:
        assert_float32_close(merged[name], expected[name], expected.scale[name])
    manifest = read_json(tmp_path / "out" / "mergecli_manifest.json")
    assert manifest["inputs"][0] == {"ref": "org/tiny-a@v1", "commit": commit}  # type: ignore[index]
    as_run = (tmp_path / "out" / "mergecli_recipe.yaml").read_text()
    assert (
        as_run
        == recipe.read_text()
        + f"\n# Hub revisions resolved by mergecli:\n#   org/tiny-a@v1 -> {commit}\n"
    )
    card = (tmp_path / "out" / "README.md").read_text()
    assert yaml.safe_load(card.split("---")[1])["base_model"] == ["org/tiny-a"]
    assert f"| `org/tiny-a` | {commit} | input |" in card
    missing = write(
        tmp_path / "m.yaml",
        "merge_method: linear\nmodels:\n  - model: org/tiny-a@v2\n    parameters: {weight: 1}\n",
    )
    code, _, err = invoke(runner, "run", str(missing), "-o", str(tmp_path / "out2"))
    assert code == 3 and "org/tiny-a@v2: not in the local cache" in err


def test_bin_checkpoints_load_safely(
    family: dict[str, Path], tmp_path: Path, runner: CliRunner
) -> None:
    import shutil

    folder = tmp_path / "binmodel"
    shutil.copytree(family["b"], folder)
    tensors = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    torch.save(tensors, folder / "pytorch_model.bin")
    recipe = write(
        tmp_path / "r.yaml",
        f"merge_method: linear\nmodels:\n  - model: {family['a']}\n    parameters: {{weight: 1}}\n"
        f"  - model: {folder}\n    parameters: {{weight: 3}}\n",
    )
    code, _, err = invoke(runner, "run", str(recipe), "-o", str(tmp_path / "out"))
    assert code == 0, err
    expected = linear64([family["a"], family["b"]], [1.0, 3.0])
    merged = state(tmp_path / "out")
    for name in expected:
        assert_float32_close(merged[name], expected[name], expected.scale[name])


class Exploit:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("touch PWNED",))


def test_pickle_with_code_is_refused_never_run(
    family: dict[str, Path], tmp_path: Path, runner: CliRunner, chdir_tmp: Path
) -> None:
    import pickle
    import shutil

    folder = tmp_path / "evil"
    shutil.copytree(family["b"], folder)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"x": Exploit()}))
    recipe = write(
        tmp_path / "r.yaml",
        f"merge_method: linear\nmodels:\n  - model: {family['a']}\n    parameters: {{weight: 1}}\n"
        f"  - model: {folder}\n    parameters: {{weight: 1}}\n",
    )
    code, _, err = invoke(runner, "run", str(recipe), "-o", str(tmp_path / "out"))
    assert code == 3
    assert "refused to load pytorch_model.bin: it is not a plain tensor checkpoint" in err
    assert not (chdir_tmp / "PWNED").exists()


def test_overwrite_replaces_and_output_inside_input_is_refused(
    family: dict[str, Path], tmp_path: Path, runner: CliRunner
) -> None:
    recipe = write(tmp_path / "r.yaml", linear_recipe(family))
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    code, _, err = invoke(runner, "run", str(recipe), "-o", str(out))
    assert code == 5 and (out / "old.txt").exists()
    code, _, err = invoke(runner, "run", str(recipe), "-o", str(out), "--overwrite")
    assert (
        code == 5
        and "is not a mergecli output (no mergecli_manifest.json); it holds: old.txt" in err
    )
    assert (out / "old.txt").read_text() == "old"
    code, _, err = invoke(runner, "run", str(recipe), "-o", str(out), "--overwrite-any")
    assert code == 0, err
    assert not (out / "old.txt").exists() and (out / "model.safetensors").exists()
    code, _, err = invoke(runner, "run", str(recipe), "-o", str(out), "--overwrite")
    assert code == 0, err  # a mergecli output may be replaced
    code, _, err = invoke(runner, "run", str(recipe), "-o", str(family["a"] / "merged"))
    assert code == 5 and "overlaps the input model folder" in err
    assert not (family["a"] / "merged").exists()


def nan_copy(source: Path, folder: Path, tensor: str) -> Path:
    """A copy of the model in `source` with one NaN in `tensor`."""
    import shutil

    from safetensors.torch import save_file

    shutil.copytree(source, folder)
    tensors = load_file(str(folder / "model.safetensors"))
    tensors[tensor].view(-1)[3] = float("nan")
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def test_nan_in_an_input_names_tensor_and_model(
    family: dict[str, Path], tmp_path: Path, runner: CliRunner
) -> None:
    folder = nan_copy(family["b"], tmp_path / "nan", "model.norm.weight")
    recipe = write(
        tmp_path / "r.yaml",
        f"merge_method: linear\nmodels:\n  - model: {family['a']}\n    parameters: {{weight: 1}}\n"
        f"  - model: {folder}\n    parameters: {{weight: 1}}\n",
    )
    code, _, err = invoke(runner, "run", str(recipe), "-o", str(tmp_path / "out"))
    assert code == 4
    assert f"tensor `model.norm.weight` of {folder} holds 1 NaN/Inf values" in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


@pytest.mark.parametrize("method", ["ties", "dare_ties"])
def test_nan_found_by_the_statistics_pass_of_row_blocks(
    family: dict[str, Path], tmp_path: Path, method: str
) -> None:
    from mergecli.errors import NumericsError

    tensor = "model.embed_tokens.weight"
    sparse = sparse_tune(family["base"], tmp_path / "sparse", 3, 0.1)  # settled by zero counts
    folder = nan_copy(sparse, tmp_path / "nan", tensor)
    text = (
        f"merge_method: {method}\nbase_model: {family['base']}\n"
        f"parameters: {{weight: 1, density: 0.5}}\nmodels:\n"
        f"  - model: {sparse}\n  - model: {folder}\n"
    )
    plan = plan_recipe(write(tmp_path / "r.yaml", text))
    with pytest.raises(NumericsError, match=rf"tensor `{tensor}` of {folder} holds 1 NaN/Inf"):
        run_plan(plan, tmp_path / "out", text, block_elements=100)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


@pytest.mark.parametrize(
    ("method", "nan_in", "density"),
    [
        ("dare_ties", "model", 0.5),  # vouched for by its L1 sums, which turn NaN
        ("dare_ties", "model", 1.0),  # no sums for this model: checked entry by entry
        ("dare_ties", "base", 0.5),
        ("dare_ties", "base", 1.0),  # no sums at all
        ("slerp", "model", None),
        ("slerp", "base", None),
    ],
)
def test_nan_anywhere_in_a_blocked_tensor_with_statistics_is_found(
    family: dict[str, Path], tmp_path: Path, method: str, nan_in: str, density: float | None
) -> None:
    from mergecli.errors import NumericsError

    tensor = "model.layers.0.mlp.down_proj.weight"
    base, model = family["base"], family["a"]
    bad = nan_copy(base if nan_in == "base" else model, tmp_path / "nan", tensor)
    base, model = (bad, model) if nan_in == "base" else (base, bad)
    extra = f"weight: 1, density: {density}" if density is not None else "t: 0.3"
    text = (
        f"merge_method: {method}\nbase_model: {base}\nparameters: {{{extra}}}\n"
        f"models:\n  - model: {base}\n  - model: {model}\n"
        if method == "slerp"
        else f"merge_method: {method}\nbase_model: {base}\n"
        f"parameters: {{{extra}}}\nmodels:\n  - model: {model}\n"
        f"  - model: {family['b']}\n"
    )
    plan = plan_recipe(write(tmp_path / "r.yaml", text))
    with pytest.raises(NumericsError, match=rf"tensor `{tensor}` of {bad} holds 1 NaN/Inf"):
        run_plan(plan, tmp_path / "out", text, block_elements=100)


def test_sums_that_overflow_do_not_vouch_and_do_not_accuse(family: dict[str, Path]) -> None:
    from mergecli.engine.numerics import check_unvouched
    from mergecli.plan.types import InputRef

    text = (
        f"merge_method: dare_ties\nbase_model: {family['base']}\n"
        f"parameters: {{weight: 1, density: 0.5}}\nmodels:\n  - model: {family['a']}\n"
    )
    plan = plan_recipe(write(family["base"].parent / "vouch.yaml", text))
    refs = [InputRef(0, "x"), InputRef(1, "x")]
    finite = [torch.full((2, 2), 3e38), torch.zeros(2, 2)]
    check_unvouched(plan, refs, finite, [[[float("inf")], [1.0]]], True)  # overflowed: checked
    nan = [torch.zeros(2, 2), torch.tensor([[0.0, float("nan")], [0.0, 0.0]])]
    with pytest.raises(Exception, match="holds 1 NaN/Inf"):
        check_unvouched(plan, refs, nan, [[]], True)  # no sums: the base is checked
    check_unvouched(plan, refs, nan, [[[1.0]]], True)  # finite sums vouch (the premise)


def test_online_hub_path_with_a_mocked_transport(
    family: dict[str, Path], tmp_path: Path, runner: CliRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Online: the revision is resolved to a commit, and only the files read are downloaded."""
    import shutil
    from types import SimpleNamespace

    import huggingface_hub

    commit = "fedcba9876543210fedcba9876543210fedcba98"
    downloaded: list[str] = []
    asked: list[tuple[str, str | None]] = []

    def model_info(self: object, repo_id: str, revision: str | None = None) -> SimpleNamespace:
        asked.append((repo_id, revision))
        return SimpleNamespace(sha=commit)

    def list_repo_files(self: object, repo_id: str, revision: str | None = None) -> list[str]:
        assert revision == commit
        return [*sorted(p.name for p in family["b"].iterdir()), "original/consolidated.pth"]

    def hf_hub_download(
        repo_id: str, filename: str, revision: str, cache_dir: Path, local_files_only: bool
    ) -> str:
        assert (revision, local_files_only) == (commit, False)
        downloaded.append(filename)
        target = tmp_path / "dl" / filename
        target.parent.mkdir(exist_ok=True)
        shutil.copyfile(family["b"] / filename, target)
        return str(target)

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", list_repo_files)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)

    def get_safetensors_metadata(repo_id: str, revision: str) -> SimpleNamespace:
        assert revision == commit
        raw = (family["b"] / "model.safetensors").read_bytes()
        header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
        metadata = header.pop("__metadata__", {})
        tensors = {
            k: SimpleNamespace(
                dtype=v["dtype"], shape=v["shape"], data_offsets=tuple(v["data_offsets"])
            )
            for k, v in header.items()
        }
        return SimpleNamespace(
            files_metadata={
                "model.safetensors": SimpleNamespace(metadata=metadata, tensors=tensors)
            }
        )

    monkeypatch.setattr(huggingface_hub, "get_safetensors_metadata", get_safetensors_metadata)
    recipe = write(
        tmp_path / "r.yaml",
        f"merge_method: linear\nmodels:\n  - model: {family['a']}\n    parameters: {{weight: 1}}\n"
        "  - model: org/tiny-b@release\n    parameters: {weight: 1}\n",
    )
    code, _, err = invoke(runner, "validate", str(recipe))
    assert code == 0, err
    assert asked == [("org/tiny-b", "release")]
    # validation reads configs, tokenizers (to compare vocabularies) and headers, no weights
    assert downloaded == ["config.json", "tokenizer.json"]
    code, _, err = invoke(runner, "run", str(recipe), "-o", str(tmp_path / "out"))
    assert code == 0, err
    assert "original/consolidated.pth" not in downloaded and "model.safetensors" in downloaded
    expected = linear64([family["a"], family["b"]], [1.0, 1.0])
    merged = state(tmp_path / "out")
    for name in expected:
        assert_float32_close(merged[name], expected[name], expected.scale[name])
