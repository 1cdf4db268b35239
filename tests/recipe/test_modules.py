"""mergekit's multi-module form (`modules:`, #13): per-module models, slices and parameters on
a T5 (encoder, decoder, shared) and a Qwen2-VL (text_decoder, vision_tower,
multi_modal_projector), checked tensor by tensor against the formula in float64."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import invoke, write
from mergecli.model.modules import module_names, module_of


def _tunes(root: Path, make: type, config: tf.PretrainedConfig) -> dict[str, Path]:
    torch.manual_seed(0)
    base = make(config).eval()
    out = {"base": root / "base"}
    base.save_pretrained(out["base"])
    for i in (1, 2):
        model = make(config).eval()
        model.load_state_dict(base.state_dict())
        with torch.no_grad():
            for param in model.parameters():
                param.add_(torch.randn_like(param) * 0.01 * i)
        out[f"ft{i}"] = root / f"ft{i}"
        model.save_pretrained(out[f"ft{i}"])
    return out


@pytest.fixture(scope="module")
def t5(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    config = tf.T5Config(
        vocab_size=64,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=3,
        num_decoder_layers=2,
        num_heads=4,
        tie_word_embeddings=False,
        feed_forward_proj="gated-gelu",
    )
    return _tunes(tmp_path_factory.mktemp("t5"), tf.T5ForConditionalGeneration, config)


@pytest.fixture(scope="module")
def vl(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    config = tf.Qwen2VLConfig(
        text_config=dict(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]},
        ),
        vision_config=dict(
            depth=2, embed_dim=32, hidden_size=32, num_heads=4, mlp_ratio=2, patch_size=14
        ),
    )
    return _tunes(tmp_path_factory.mktemp("vl"), tf.Qwen2VLForConditionalGeneration, config)


def _load(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v.double() for k, v in load_file(folder / "model.safetensors").items()}


def _run(runner: CliRunner, tmp_path: Path, text: str) -> dict[str, torch.Tensor]:
    out = tmp_path / "out"
    code, _, err = invoke(runner, "run", str(write(tmp_path / "r.yaml", text)), "-o", str(out))
    assert code == 0, err
    return _load(out)


def test_module_names_follow_mergekit() -> None:
    t5_names = ["shared.weight", "encoder.block.0.x", "decoder.block.0.x", "lm_head.weight"]
    assert module_names(t5_names) == ("encoder", "decoder", "shared")
    assert module_of("lm_head.weight", module_names(t5_names)) == "shared"
    vl_names = ["model.layers.0.x", "visual.blocks.0.x", "visual.merger.mlp.0.weight"]
    found = module_names(vl_names)
    assert found == ("text_decoder", "multi_modal_projector", "vision_tower")
    assert [module_of(n, found) for n in vl_names] == [
        "text_decoder",
        "vision_tower",
        "multi_modal_projector",
    ]
    assert module_names(["model.layers.0.x", "lm_head.weight"]) == ("default",)
    assert module_names(["bert.encoder.layer.0.x"]) == ("default",)


def test_t5_modules_take_their_own_parameters(
    t5: dict[str, Path], tmp_path: Path, runner: CliRunner
) -> None:
    text = (
        f"merge_method: task_arithmetic\nbase_model: {t5['base']}\nmodules:\n"
        "  encoder:\n    parameters: {weight: 0.2}\n    models:\n"
        f"      - model: {t5['ft1']}\n      - model: {t5['ft2']}\n"
        "        parameters: {weight: 0.7}\n"
        "  decoder:\n    models:\n"
        f"      - model: {t5['ft1']}\n        parameters: {{weight: [0.0, 1.0]}}\n"
        f"      - model: {t5['ft2']}\n        parameters: {{weight: 0.5}}\n"
        "  shared:\n    models:\n"
        f"      - model: {t5['ft1']}\n        parameters: {{weight: 0.3}}\n"
        f"      - model: {t5['ft2']}\n        parameters: {{weight: 0.3}}\n"
    )
    merged = _run(runner, tmp_path, text)
    base, a, b = (_load(t5[k]) for k in ("base", "ft1", "ft2"))

    def want(name: str, wa: float, wb: float) -> torch.Tensor:
        return base[name] + wa * (a[name] - base[name]) + wb * (b[name] - base[name])

    cases = {
        "encoder.block.2.layer.1.DenseReluDense.wi_0.weight": (0.2, 0.7),
        "encoder.final_layer_norm.weight": (0.2, 0.7),
        "decoder.block.0.layer.0.SelfAttention.q.weight": (0.0, 0.5),
        "decoder.block.1.layer.2.DenseReluDense.wo.weight": (1.0, 0.5),
        "decoder.final_layer_norm.weight": (0.0, 0.5),
        "shared.weight": (0.3, 0.3),
    }
    for name, (wa, wb) in cases.items():
        torch.testing.assert_close(merged[name], want(name, wa, wb), rtol=1e-5, atol=1e-6)
    assert set(merged) == set(base)


def test_vl_modules_slice_the_text_layers_only(
    vl: dict[str, Path], tmp_path: Path, runner: CliRunner
) -> None:
    text = (
        "merge_method: linear\nparameters: {weight: 0.5}\nmodules:\n"
        "  text_decoder:\n    slices:\n      - sources:\n"
        f"          - model: {vl['ft1']}\n            layer_range: [0, 2]\n"
        "            parameters: {weight: [0.2, 0.8]}\n"
        f"          - model: {vl['ft2']}\n            layer_range: [0, 2]\n"
        f"      - sources:\n          - model: {vl['base']}\n            layer_range: [1, 3]\n"
        "  vision_tower:\n    parameters: {weight: 0.25}\n    models:\n"
        f"      - model: {vl['ft1']}\n      - model: {vl['base']}\n"
        "        parameters: {weight: 0.75}\n"
        "  multi_modal_projector:\n    models:\n"
        f"      - model: {vl['ft2']}\n      - model: {vl['ft1']}\n"
    )
    merged = _run(runner, tmp_path, text)
    base, a, b = (_load(vl[k]) for k in ("base", "ft1", "ft2"))
    up = "mlp.up_proj.weight"
    torch.testing.assert_close(
        merged[f"model.layers.1.{up}"],
        (0.8 * a[f"model.layers.1.{up}"] + 0.5 * b[f"model.layers.1.{up}"]) / 1.3,
    )
    torch.testing.assert_close(merged[f"model.layers.2.{up}"], base[f"model.layers.1.{up}"])
    torch.testing.assert_close(merged[f"model.layers.3.{up}"], base[f"model.layers.2.{up}"])
    name = "visual.blocks.1.mlp.fc1.weight"
    torch.testing.assert_close(merged[name], 0.25 * a[name] + 0.75 * base[name])
    name = "visual.merger.mlp.0.weight"
    torch.testing.assert_close(merged[name], 0.5 * a[name] + 0.5 * b[name])
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["text_config"]["num_hidden_layers"] == 4
    assert config["vision_config"]["depth"] == 2


def test_the_default_module_is_the_models_form(
    family: dict[str, Path], tmp_path: Path, runner: CliRunner
) -> None:
    models = (
        f"[{{model: {family['a']}, parameters: {{weight: 0.3}}}}, "
        f"{{model: {family['b']}, parameters: {{weight: 0.7}}}}]"
    )
    (tmp_path / "p").mkdir()
    (tmp_path / "m").mkdir()
    plain = _run(runner, tmp_path / "p", f"merge_method: linear\nmodels: {models}\n")
    moduled = _run(
        runner,
        tmp_path / "m",
        f"merge_method: linear\nmodules:\n  default:\n    models: {models}\n",
    )
    assert plain.keys() == moduled.keys()
    for name in plain:
        assert torch.equal(plain[name], moduled[name]), name


@pytest.mark.parametrize(
    ("body", "fragments"),
    [
        (
            "  default:\n    models: [{model: A}, {model: B}]\n  vision_tower:\n"
            "    models: [{model: A}]\n",
            ["modules.vision_tower: ", "has no module `vision_tower`", "its modules are `default`"],
        ),
        (
            "  default:\n    slices: []\n",
            ["give exactly one of `models` or `slices` in a module (found none)"],
        ),
        (
            "  default:\n    parameters: {wieght: 1}\n    models: [{model: A}, {model: B}]\n",
            [
                "modules.default.parameters.wieght: unknown parameter `wieght`",
                "did you mean `weight`",
            ],
        ),
    ],
)
def test_bad_modules_on_a_llama(
    family: dict[str, Path],
    tmp_path: Path,
    runner: CliRunner,
    body: str,
    fragments: list[str],
) -> None:
    body = body.replace("model: A", f"model: {family['a']}").replace(
        "model: B", f"model: {family['b']}"
    )
    recipe = write(
        tmp_path / "r.yaml", f"merge_method: linear\nparameters: {{weight: 1}}\nmodules:\n{body}"
    )
    code, _, err = invoke(runner, "validate", str(recipe))
    assert code == 2, err
    flat = " ".join(err.split())
    for fragment in fragments:
        assert fragment in flat, err


def test_a_module_left_out_or_a_sliced_vision_tower_is_refused(
    vl: dict[str, Path], tmp_path: Path, runner: CliRunner
) -> None:
    text = (
        "merge_method: linear\nparameters: {weight: 1}\nmodules:\n"
        f"  text_decoder:\n    models: [{{model: {vl['ft1']}}}, {{model: {vl['ft2']}}}]\n"
        "  vision_tower:\n    slices:\n      - sources:\n"
        f"          - model: {vl['ft1']}\n            layer_range: [0, 2]\n"
    )
    out = tmp_path / "out"
    code, _, err = invoke(runner, "run", str(write(tmp_path / "r.yaml", text)), "-o", str(out))
    assert code == 2, err
    flat = " ".join(err.split())
    assert "module `multi_modal_projector` of" in flat
    assert "is in no entry of `modules:`, so the output would lack it" in flat
    assert "add `multi_modal_projector: {models: [{model: ...}]}` to `modules:`" in flat
    assert "modules.vision_tower.slices: module `vision_tower` does not hold the main" in flat
    assert "only `text_decoder` can be sliced" in flat
    assert not out.exists()
