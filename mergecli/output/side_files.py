"""Everything written beside the shards: index, config, tokenizer files, chat template, recipe, card."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from mergecli.io.jsonfile import read_json
from mergecli.io.source import LocalSource
from mergecli.io.writer import ShardWriter
from mergecli.output.card import render_card
from mergecli.plan.types import MergePlan
from mergecli.vocab.planning import source_model
from mergecli.vocab.tokens import union_document

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "spiece.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


STALE_WITH_UNION = frozenset(
    {"tokenizer.json", "vocab.json", "merges.txt", "tokenizer.model", "spiece.model",
     "added_tokens.json", "vocab.txt"}
)  # fmt: skip


def write_side_files(plan: MergePlan, work: Path, writer: ShardWriter, recipe_text: str) -> None:
    write_json(work / "model.safetensors.index.json", writer.index())
    write_json(work / "config.json", plan.config)
    template = plan.models[plan.template].source
    if "generation_config.json" in template.files():
        shutil.copyfile(template.local("generation_config.json"), work / "generation_config.json")
    tok_source = plan.models[source_model(plan.recipe, plan.refs, plan.template)].source
    union = plan.vocab is not None and bool(plan.vocab.new_tokens)
    available = set(tok_source.files())
    for name in TOKENIZER_FILES:
        if name in available and not (union and name in STALE_WITH_UNION):
            shutil.copyfile(tok_source.local(name), work / name)
    if union:
        _write_union_tokenizer(plan, work)
    if plan.chat_template is not None:
        _write_chat_template(work, plan.chat_template)
    (work / "mergecli_recipe.yaml").write_text(recipe_as_run(plan, recipe_text), encoding="utf-8")
    (work / "README.md").write_text(render_card(plan, recipe_text), encoding="utf-8")


def _write_union_tokenizer(plan: MergePlan, work: Path) -> None:
    """tokenizer.json with the union's tokens; tokenizer_config.json lists new added tokens."""
    assert plan.vocab is not None
    new = plan.vocab.new_tokens
    template = read_json(
        plan.models[plan.template].source.local("tokenizer.json"), plan.models[plan.template].label
    )
    documents = {
        m: read_json(plan.models[m].source.local("tokenizer.json"), plan.models[m].label)
        for m in dict.fromkeys(t.model for t in new)
    }
    merged = union_document(template, documents, new)
    write_json(work / "tokenizer.json", merged)
    config_path = work / "tokenizer_config.json"
    if not config_path.exists():
        return
    config = read_json(config_path, "output")
    decoder = config.get("added_tokens_decoder")
    if isinstance(decoder, dict):
        for entry in merged.get("added_tokens") or []:
            fields = {k: v for k, v in entry.items() if k != "id"}
            decoder.setdefault(str(entry["id"]), fields)
    write_json(config_path, config)


def recipe_as_run(plan: MergePlan, recipe_text: str) -> str:
    """The recipe verbatim, plus comment lines pinning each Hub model to its commit."""
    pins = [
        f"#   {ref} -> {model.source.commit}"
        for ref, model in zip(plan.refs, plan.models)
        if not isinstance(model.source, LocalSource)
    ]
    if not pins:
        return recipe_text
    return (
        recipe_text.rstrip("\n")
        + "\n\n# Hub revisions resolved by mergecli:\n"
        + "\n".join(pins)
        + "\n"
    )


def _write_chat_template(work: Path, template: str) -> None:
    (work / "chat_template.jinja").write_text(template, encoding="utf-8")
    config_path = work / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.exists() else {}
    config["chat_template"] = template
    write_json(config_path, config)
