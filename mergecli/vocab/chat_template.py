"""`chat_template`: inline Jinja, a built-in name, `auto`, or the name of a recipe model.

- a model of the recipe (as written there): that model's template (`chat_template.jinja`,
  or `chat_template` in its `tokenizer_config.json`);
- `auto`: the template most merged models share (the first such model's on a tie);
- `chatml`, `llama3`, `mistral`, `alpaca`, `exaone`: built-in templates of those formats;
- text with `{{` or `{%`: inline Jinja, written as given.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from mergecli.errors import Problem
from mergecli.io.checkpoint import ModelInfo
from mergecli.io.jsonfile import read_json
from mergecli.recipe.schema import ModelRef

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' "
    "+ message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ message['content'] + '\n\n' }}{% endif %}"
    "{% endfor %}"
)
ALPACA = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ '### Instruction:\n' + message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ '### Response:\n' + message['content'] + eos_token + '\n\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"
)
EXAONE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '[|assistant|]' + message['content'] + '[|endofturn|]\n' }}"
    "{% else %}{{ '[|' + message['role'] + '|]' + message['content'] + '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '[|assistant|]' }}{% endif %}"
)
# the formats mergekit's recipes name (written here from the formats, not copied)
BUILT_IN = {
    "chatml": CHATML,
    "llama3": LLAMA3,
    "mistral": MISTRAL,
    "alpaca": ALPACA,
    "exaone": EXAONE,
}


def read_template(model: ModelInfo) -> str | None:
    """A model's default chat template, if it has one."""
    files = set(model.source.files())
    if "chat_template.jinja" in files:
        return model.source.local("chat_template.jinja").read_text(encoding="utf-8")
    if "tokenizer_config.json" not in files:
        return None
    config = read_json(model.source.local("tokenizer_config.json"), model.label)
    value = config.get("chat_template") if isinstance(config, dict) else None
    if isinstance(value, list):
        value = next((t.get("template") for t in value if t.get("name") == "default"), None)
    return value if isinstance(value, str) else None


def resolve_template(
    value: str, refs: Sequence[ModelRef], models: Sequence[ModelInfo], merged: Sequence[int]
) -> tuple[str | None, Problem | None]:
    """The template text `value` stands for, or the problem with it."""
    if "{{" in value or "{%" in value:
        return value, None
    if value in BUILT_IN:
        return BUILT_IN[value], None
    if value == "auto":
        found = [t for t in (read_template(models[i]) for i in merged) if t is not None]
        if not found:
            return None, Problem(
                "chat_template", "`auto`: none of the merged models has a chat template", _HINT
            )
        return Counter(found).most_common(1)[0][0], None
    for ref, model in zip(refs, models):
        if value in (str(ref), ref.path):
            template = read_template(model)
            if template is None:
                return None, Problem(
                    "chat_template", f"{model.label} has no chat template", _HINT, code=4
                )
            return template, None
    names = ", ".join(["auto", *BUILT_IN, *(str(r) for r in refs)])
    return None, Problem(
        "chat_template",
        f"unknown chat template {value!r}: not Jinja, a built-in name or a model of the recipe",
        f"use one of: {names}; or inline Jinja text",
    )


_HINT = "name a model that has one, use `chatml`, or give the Jinja text inline"
