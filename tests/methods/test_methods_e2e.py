"""One recipe per method over tiny real checkpoints, checked against float64 math."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import invoke, write

NAMES = [
    "model.layers.1.self_attn.q_proj.weight",
    "model.layers.2.mlp.down_proj.weight",
    "model.norm.weight",
]


def load(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def merged(runner: CliRunner, tmp_path: Path, text: str, *extra: str) -> dict[str, torch.Tensor]:
    recipe = write(tmp_path / "r.yaml", text)
    out = tmp_path / "out"
    code, _, err = invoke(runner, "run", str(recipe), "-o", str(out), "--quiet", *extra)
    assert code == 0, err
    return load(out)


def close(actual: torch.Tensor, expected: torch.Tensor, scale: float = 1.0) -> None:
    """float32 result within a few float32 roundings of the float64 result."""
    assert actual.dtype == torch.float32
    tol = 8 * torch.finfo(torch.float32).eps * scale
    assert (actual.double() - expected).abs().max() <= tol, (actual.double() - expected).abs().max()


def trimmed(delta: torch.Tensor, density: float) -> torch.Tensor:
    flat = delta.reshape(-1)
    k = max(1, math.floor(density * flat.numel() + 1e-9))
    order = sorted(range(flat.numel()), key=lambda i: (-abs(float(flat[i])), i))
    out = torch.zeros_like(flat)
    out[order[:k]] = flat[order[:k]]
    return out.reshape(delta.shape)


def test_task_arithmetic_e2e(family: dict[str, Path], tmp_path: Path, runner: CliRunner) -> None:
    got = merged(
        runner,
        tmp_path,
        f"merge_method: task_arithmetic\nbase_model: {family['base']}\nparameters: {{lambda: 0.9}}\nmodels:\n"
        f"  - model: {family['a']}\n    parameters: {{weight: 0.7}}\n  - model: {family['b']}\n    parameters: {{weight: -0.3}}\n",
    )
    b, a, c = (load(family[k]) for k in ("base", "a", "b"))
    for name in NAMES:
        expected = b[name].double() + 0.9 * (
            0.7 * (a[name].double() - b[name].double())
            - 0.3 * (c[name].double() - b[name].double())
        )
        close(got[name], expected, float(b[name].abs().max()) + 1)


def test_ties_e2e_base_listed_among_models(
    family: dict[str, Path], tmp_path: Path, runner: CliRunner
) -> None:
    got = merged(
        runner,
        tmp_path,
        f"merge_method: ties\nbase_model: {family['base']}\nmodels:\n  - model: {family['base']}\n"
        f"  - model: {family['a']}\n    parameters: {{weight: 1.0, density: 0.4}}\n"
        f"  - model: {family['b']}\n    parameters: {{weight: 0.5, density: 0.6}}\n",
    )
    b, a, c = (load(family[k]) for k in ("base", "a", "b"))
    for name in NAMES:
        base = b[name].double()
        e = [
            1.0 * trimmed(a[name].double() - base, 0.4),
            0.5 * trimmed(c[name].double() - base, 0.6),
        ]
        sign = torch.where(e[0] + e[1] >= 0, 1.0, -1.0).double()
        agree = [torch.sign(x) == sign for x in e]
        num = sum(x * m for x, m in zip(e, agree))
        den = sum(w * m.double() for w, m in zip([1.0, 0.5], agree))
        expected = base + num / torch.where(den == 0, 1.0, den)
        close(got[name], expected, float(base.abs().max()) + 1)


def test_slerp_e2e_with_gradients(
    family: dict[str, Path], tmp_path: Path, runner: CliRunner
) -> None:
    got = merged(
        runner,
        tmp_path,
        f"merge_method: slerp\nbase_model: {family['a']}\nslices:\n  - sources:\n"
        f"      - model: {family['a']}\n        layer_range: [0, 3]\n      - model: {family['b']}\n        layer_range: [0, 3]\n"
        "parameters:\n  t:\n    - filter: mlp\n      value: [0.0, 1.0]\n    - value: 0.25\n",
    )
    a, c = load(family["a"]), load(family["b"])
    for name, t in [
        (NAMES[0], 0.25),
        (NAMES[1], 1.0),
        ("model.layers.1.mlp.up_proj.weight", 0.5),
        ("model.norm.weight", 0.25),
    ]:
        x, y = a[name].double(), c[name].double()
        cos = float((x.reshape(-1) @ y.reshape(-1)) / (x.norm() * y.norm()))
        theta = math.acos(cos)
        expected = (math.sin((1 - t) * theta) * x + math.sin(t * theta) * y) / math.sin(theta)
        close(got[name], expected, float(x.abs().max() + y.abs().max()))


def test_dare_ties_is_byte_identical_per_seed(
    family: dict[str, Path], tmp_path: Path, runner: CliRunner
) -> None:
    text = (
        f"merge_method: dare_ties\nbase_model: {family['base']}\nseed: 5\nmodels:\n"
        f"  - model: {family['a']}\n    parameters: {{weight: 1.0, density: 0.5}}\n"
        f"  - model: {family['b']}\n    parameters: {{weight: 1.0, density: 0.5}}\n"
    )
    write(tmp_path / "r.yaml", text)
    outs = []
    for i, threads in enumerate(["1", "2"]):
        out = tmp_path / f"o{i}"
        code, _, err = invoke(
            runner, "run", str(tmp_path / "r.yaml"), "-o", str(out), "--quiet", "--threads", threads
        )
        assert code == 0, err
        outs.append((out / "model.safetensors").read_bytes())
    assert outs[0] == outs[1]
    code, _, _ = invoke(
        runner,
        "run",
        str(tmp_path / "r.yaml"),
        "-o",
        str(tmp_path / "o2"),
        "--quiet",
        "--seed",
        "6",
    )
    assert code == 0 and (tmp_path / "o2" / "model.safetensors").read_bytes() != outs[0]
    card = (tmp_path / "o0" / "README.md").read_text()
    assert "- Seed: 5" in card


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("nearswap", "parameters: {t: 0.01}\n"),
        ("model_stock", ""),
        ("breadcrumbs", "parameters: {gamma: 0.05}\n"),
    ],
)
def test_other_methods_run_and_load(
    family: dict[str, Path], tmp_path: Path, runner: CliRunner, method: str, params: str
) -> None:
    needs_two = method == "nearswap"
    models = [family["a"]] if needs_two else [family["a"], family["b"]]
    weights = "" if method != "breadcrumbs" else "\n    parameters: {weight: 1.0, density: 0.5}"
    text = f"merge_method: {method}\nbase_model: {family['base']}\n{params}models:\n" + "".join(
        f"  - model: {m}{weights}\n" for m in models
    )
    got = merged(runner, tmp_path, text)
    b, a = load(family["base"]), load(family["a"])
    name = NAMES[0]
    if method == "nearswap":
        x, y = b[name].double(), a[name].double()
        w = (0.01 / (x - y).abs().clamp(min=1e-6)).clamp(0, 1)
        close(got[name], x + w * (y - x), 1.0)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_missing_base_and_too_many_models(
    family: dict[str, Path], tmp_path: Path, runner: CliRunner
) -> None:
    recipe = write(
        tmp_path / "r.yaml",
        f"merge_method: slerp\nparameters: {{t: 0.5}}\nmodels:\n  - model: {family['a']}\n  - model: {family['b']}\n",
    )
    code, _, err = invoke(runner, "validate", str(recipe))
    assert code == 2
    assert (
        "base_model: method `slerp` needs a `base_model` (task vectors are taken against it)" in err
    )
    assert "models: method `slerp` got 2 models besides the base" in err  # both problems at once
    recipe = write(
        tmp_path / "r.yaml",
        f"merge_method: slerp\nbase_model: {family['base']}\nparameters: {{t: 0.5}}\nmodels:\n  - model: {family['a']}\n  - model: {family['b']}\n",
    )
    code, _, err = invoke(runner, "validate", str(recipe))
    assert (
        code == 2
        and "models: method `slerp` got 2 models besides the base\n      hint: it takes exactly 1"
        in err
    )


def recipe_for(method: str, family: dict[str, Path]) -> str:
    """A small valid recipe for any registered method over the tiny family."""
    from mergecli import methods

    spec = methods.get(method)
    assert spec is not None
    if method == "passthrough":
        return f"merge_method: passthrough\nmodels:\n  - model: {family['a']}\n"
    count = spec.max_models or 2
    per = {"weight": 1.0, "density": 0.6}
    model_params = {p.name: per[p.name] for p in spec.scoped("model") if p.name in per}
    lines = [f"merge_method: {method}"]
    if spec.uses_base:
        lines.append(f"base_model: {family['base']}")
    required = {p.name: 0.4 for p in spec.scoped("global") if p.required}
    if required:
        lines.append("parameters: {" + ", ".join(f"{k}: {v}" for k, v in required.items()) + "}")
    lines.append("models:")
    for name in ["a", "b"][:count]:
        lines.append(f"  - model: {family[name]}")
        if model_params:
            lines.append(
                "    parameters: {" + ", ".join(f"{k}: {v}" for k, v in model_params.items()) + "}"
            )
    return "\n".join(lines) + "\nseed: 1\n"


def test_every_method_runs_end_to_end(
    family: dict[str, Path], tmp_path: Path, runner: CliRunner
) -> None:
    from transformers import AutoModelForCausalLM

    from mergecli import methods

    ids = torch.tensor([[1, 2, 3, 4]])
    for method in methods.names():
        if method == "mwa":
            continue  # needs checkpoints with trainer_state.json: test_mwa_weights_checkpoints_by_loss
        folder = tmp_path / method
        folder.mkdir()
        recipe = write(folder / "r.yaml", recipe_for(method, family))
        code, _, err = invoke(runner, "run", str(recipe), "-o", str(folder / "out"), "--quiet")
        assert code == 0, (method, err)
        model = AutoModelForCausalLM.from_pretrained(folder / "out").eval()
        with torch.no_grad():
            assert torch.isfinite(model(ids).logits).all(), method


def test_mwa_weights_checkpoints_by_loss(
    family: dict[str, Path], tmp_path: Path, runner: CliRunner
) -> None:
    import json
    import shutil

    losses = {"a": 0.9, "b": 0.4}
    for name, loss in losses.items():
        shutil.copytree(family[name], tmp_path / name)
        state = {
            "log_history": [
                {"loss": 3.0, "step": 1},
                {"eval_loss": 1.0, "step": 2},
                {"loss": loss, "step": 3},
            ]
        }
        (tmp_path / name / "trainer_state.json").write_text(json.dumps(state))
    text = f"merge_method: mwa\nparameters: {{penalty: 2.0}}\nmodels:\n  - model: {tmp_path / 'a'}\n  - model: {tmp_path / 'b'}\n"
    got = merged(runner, tmp_path, text)
    raw = {k: math.exp(-2.0 * v) for k, v in losses.items()}
    w = {k: v / sum(raw.values()) for k, v in raw.items()}
    a, b = load(family["a"]), load(family["b"])
    for name in NAMES:
        expected = w["a"] * a[name].double() + w["b"] * b[name].double()
        close(got[name], expected, float(a[name].abs().max() + b[name].abs().max()))
    from mergecli.cli._common import plan_recipe
    from mergecli.engine.run import run_plan

    plan = plan_recipe(write(tmp_path / "r1.yaml", text))
    whole = run_plan(plan, tmp_path / "w", text, reproducible=True, block_elements=1 << 30)
    cut = run_plan(plan, tmp_path / "c", text, reproducible=True, block_elements=100)
    assert whole.files == cut.files  # element-wise: row blocks give the same bytes
    (tmp_path / "b" / "trainer_state.json").unlink()
    recipe = write(tmp_path / "r2.yaml", text)
    code, _, err = invoke(runner, "validate", str(recipe))
    assert (
        code == 4 and "no `loss` in the log_history of trainer_state.json for input(s) [1]" in err
    )


def test_consensus_saves_bit_packed_task_masks(
    family: dict[str, Path], tmp_path: Path, runner: CliRunner
) -> None:
    import hashlib
    import json

    import numpy as np

    text = (
        f"merge_method: consensus\nbase_model: {family['base']}\nparameters: {{k: 1, save_masks: tall}}\nmodels:\n"
        f"  - model: {family['a']}\n    parameters: {{lambda: 0.4}}\n  - model: {family['b']}\n    parameters: {{lambda: 0.6}}\n"
    )
    merged(runner, tmp_path, text)
    masks = load_file(str(tmp_path / "out" / "tall" / "masks.safetensors"))
    b, a, c = (load(family[k]) for k in ("base", "a", "b"))
    for name in NAMES:
        d = [a[name].double() - b[name].double(), c[name].double() - b[name].double()]
        total = d[0] + d[1]
        for i, lam in enumerate([0.4, 0.6]):
            expected = (d[i].abs() >= lam * (total - d[i]).abs()).numpy()
            packed = masks[f"{name}:task{i}"].numpy()
            assert np.array_equal(
                np.unpackbits(packed, axis=-1, count=expected.shape[-1]).astype(bool), expected
            )
    manifest = json.loads((tmp_path / "out" / "mergecli_manifest.json").read_text())
    digest = hashlib.sha256(
        (tmp_path / "out" / "tall" / "masks.safetensors").read_bytes()
    ).hexdigest()
    assert manifest["outputs"]["tall/masks.safetensors"] == digest
    bad = write(tmp_path / "bad.yaml", text.replace("save_masks: tall", "save_masks: ../escape"))
    code, _, err = invoke(runner, "validate", str(bad))
    assert (
        code == 2
        and "save_masks '../escape' must be a relative folder inside the output (no `..`)" in err
    )


def test_every_method_pipeline_matches_the_method_in_float64(
    family: dict[str, Path], tmp_path: Path, runner: CliRunner
) -> None:
    """The CLI output equals the method applied in float64 to tensors read independently,
    with parameters taken from the recipe by hand: checks base selection, parameter
    resolution and casting for every method (the math itself is checked in test_methods*)."""
    from mergecli import methods
    from mergecli.methods.spec import MergeArgs

    base = load(family["base"])
    inputs = {"a": load(family["a"]), "b": load(family["b"])}
    for method in methods.names():
        if method in ("mwa", "passthrough"):
            continue
        spec = methods.get(method)
        assert spec is not None
        folder = tmp_path / method
        folder.mkdir()
        text = recipe_for(method, family)
        code, _, err = invoke(
            runner, "run", str(write(folder / "r.yaml", text)), "-o", str(folder / "out"), "--quiet"
        )
        assert code == 0, (method, err)
        got = load(folder / "out")
        count = spec.max_models or 2
        per = {p.name: p.default for p in spec.scoped("model")} | {
            k: v
            for k, v in {"weight": 1.0, "density": 0.6}.items()
            if spec.param(k) and spec.param(k).scope == "model"
        }  # type: ignore[union-attr]
        params = {p.name: (0.4 if p.required else p.default) for p in spec.scoped("global")}
        for name in NAMES:
            tensors = [inputs[k][name].double() for k in ["a", "b"][:count]]
            args = MergeArgs(
                tensors,
                base[name].double() if spec.uses_base else None,
                params,
                [per] * count,
                name,
                1,
            )
            expected = methods.apply(spec, args)
            scale = float(max(t.abs().max() for t in tensors)) + float(base[name].abs().max())
            diff = (got[name].double() - expected).abs()
            assert diff.max() <= 64 * torch.finfo(torch.float32).eps * scale, (
                method,
                name,
                float(diff.max()),
            )


def test_density_zero_gives_the_base_and_ints_are_copied(
    family: dict[str, Path], tmp_path: Path, runner: CliRunner
) -> None:
    import shutil

    from safetensors.torch import save_file

    folders = {}
    for name, offset in (("base", 0), ("a", 5), ("b", 9)):
        folders[name] = tmp_path / name
        shutil.copytree(family[name], folders[name])
        tensors = load(folders[name])
        tensors["model.step_counter"] = torch.arange(4, dtype=torch.int64) + offset
        save_file(tensors, str(folders[name] / "model.safetensors"), metadata={"format": "pt"})
    got = merged(
        runner,
        tmp_path,
        f"merge_method: ties\nbase_model: {folders['base']}\nmodels:\n"
        f"  - model: {folders['a']}\n    parameters: {{weight: 1, density: 0.0}}\n"
        f"  - model: {folders['b']}\n    parameters: {{weight: 1, density: 0.0}}\n",
    )
    base = load(folders["base"])
    assert torch.equal(got["model.step_counter"], base["model.step_counter"])
    for name in NAMES:
        assert torch.equal(got[name], base[name])
