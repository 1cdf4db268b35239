"""`chat_template`: by model name, `auto`, a built-in name, or inline Jinja."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from transformers import AutoTokenizer
from typer.testing import CliRunner

from conftest import invoke, write

ZEPHYR = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
OTHER = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
CHAT = [{"role": "user", "content": "hi"}]


@pytest.fixture
def templated(family: dict[str, Path], tmp_path: Path) -> dict[str, Path]:
    """Copies of a and b with chat templates (a in tokenizer_config.json, b as a .jinja file)
    and of base with another one."""
    out = {name: tmp_path / name for name in ("base", "a", "b")}
    for name, folder in out.items():
        shutil.copytree(family[name], folder)
    config_path = out["a"] / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = ZEPHYR
    config_path.write_text(json.dumps(config))
    (out["b"] / "chat_template.jinja").write_text(ZEPHYR)
    (out["base"] / "chat_template.jinja").write_text(OTHER)
    return out


def merge(
    runner: CliRunner, tmp_path: Path, models: dict[str, Path], template: str
) -> tuple[int, str, Path]:
    text = f"merge_method: linear\nchat_template: {json.dumps(template)}\nmodels:\n" + "".join(
        f"  - model: {p}\n    parameters: {{weight: 1.0}}\n" for p in models.values()
    )
    tmp_path.mkdir(exist_ok=True)
    out = tmp_path / "out"
    code, _, err = invoke(runner, "run", str(write(tmp_path / "r.yaml", text)), "-o", str(out))
    return code, err, out


def rendered(out: Path) -> str:
    tokenizer = AutoTokenizer.from_pretrained(out)
    text = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert isinstance(text, str)
    return text


def test_template_by_model_name(
    templated: dict[str, Path], tmp_path: Path, runner: CliRunner
) -> None:
    code, err, out = merge(
        runner, tmp_path, {"base": templated["base"], "a": templated["a"]}, str(templated["a"])
    )
    assert code == 0, err
    assert (out / "chat_template.jinja").read_text() == ZEPHYR
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == ZEPHYR
    assert rendered(out) == "<|user|>hi</s>"


def test_auto_takes_the_template_most_models_share(
    templated: dict[str, Path], tmp_path: Path, runner: CliRunner
) -> None:
    code, err, out = merge(runner, tmp_path, templated, "auto")
    assert code == 0, err
    assert (out / "chat_template.jinja").read_text() == ZEPHYR


def test_chatml_by_name_and_inline_jinja(
    templated: dict[str, Path], tmp_path: Path, runner: CliRunner
) -> None:
    code, err, out = merge(runner, tmp_path / "1", templated, "chatml")
    assert code == 0, err
    assert rendered(out) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    code, err, out = merge(runner, tmp_path / "2", templated, OTHER)
    assert code == 0, err
    assert (out / "chat_template.jinja").read_text() == OTHER
    assert rendered(out) == "[user] hi\n"


def test_unknown_name_and_model_without_template_are_errors(
    family: dict[str, Path], templated: dict[str, Path], tmp_path: Path, runner: CliRunner
) -> None:
    code, err, out = merge(runner, tmp_path / "1", templated, "chatlm")
    assert code == 2
    assert (
        "chat_template: unknown chat template 'chatlm': not Jinja, a built-in name or a model of the recipe"
        in err
    )
    assert "use one of: auto, chatml, " in err
    assert not out.exists()
    code, err, out = merge(runner, tmp_path / "2", {"a": family["a"]}, str(family["a"]))
    assert code == 4
    assert f"chat_template: {family['a']} has no chat template" in err


CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello"},
    {"role": "user", "content": "Bye"},
]
RENDERED = {
    "chatml": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    "<|im_start|>assistant\nHello<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n",
    "llama3": "<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\nHello<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "mistral": "<s>Be brief.\n\n[INST] Hi [/INST]Hello</s>[INST] Bye [/INST]",
    "alpaca": "Be brief.\n\n### Instruction:\nHi\n\n### Response:\nHello</s>\n\n"
    "### Instruction:\nBye\n\n### Response:\n",
    "exaone": "[|system|]Be brief.\n[|user|]Hi\n[|assistant|]Hello[|endofturn|]\n"
    "[|user|]Bye\n[|assistant|]",
}


@pytest.mark.parametrize("name", sorted(RENDERED))
def test_built_in_templates_render_their_format(name: str) -> None:
    import jinja2

    from mergecli.vocab.chat_template import BUILT_IN

    template = jinja2.Environment().from_string(BUILT_IN[name])
    text = template.render(
        messages=CONVERSATION, add_generation_prompt=True, bos_token="<s>", eos_token="</s>"
    )
    assert text == RENDERED[name]
