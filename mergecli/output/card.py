"""The model card (README.md): Hub front matter, method, models table, recipe verbatim."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import yaml

from mergecli.io.source import HubSource
from mergecli.plan.types import MergePlan
from mergecli.recipe.parts import parts
from mergecli.recipe.settings import to_plain


def hub_ids(plan: MergePlan) -> list[str]:
    """Hub ids of every input (local folders are left out), base first."""
    return [m.source.repo_id for m in plan.models if isinstance(m.source, HubSource)]


def card_license(plan: MergePlan) -> tuple[str | None, str | None]:
    """The license (recipe's, else the inputs' when they agree) and a warning, if any."""
    if plan.recipe.license:
        return plan.recipe.license, None
    found = {m.config.get("license") for m in plan.models}
    if len(found) == 1 and None not in found:
        return str(found.pop()), None
    return (
        None,
        "no license in the recipe and the inputs do not state one license; the card has none",
    )


def render_card(plan: MergePlan, recipe_text: str) -> str:
    """Markdown with YAML front matter for the Hub."""
    license_, _ = card_license(plan)
    tags = [
        "merge",
        "mergecli",
        *[t for t in plan.recipe.tags or [] if t not in ("merge", "mergecli")],
    ]
    front: dict[str, Any] = {}
    if hub_ids(plan):
        front["base_model"] = hub_ids(plan)
    front["base_model_relation"] = "merge"
    front["library_name"] = "transformers"
    front["tags"] = tags
    if license_:
        front["license"] = license_
    method = plan.method
    title = plan.recipe.name or "Merged model"
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).rstrip(),
        "---",
        "",
        f"# {title}",
        "",
    ]
    if plan.recipe.description:
        lines += [plan.recipe.description.strip(), ""]
    lines += [
        "This model was made by merging pre-trained language models with "
        "[mergecli](https://github.com/mergecli/mergecli).",
        "",
        "## Merge details",
        "",
        f"- Method: **{method.name}** ({method.summary})"
        + (f" [paper]({method.paper})" if method.paper else ""),
    ]
    base = plan.recipe.base_model
    if base is not None:
        lines.append(f"- Base model: `{base}`")
    if method.random:
        lines.append(f"- Seed: {plan.seed}")
    lines += [
        "",
        "## Models",
        "",
        *_models_table(plan),
        "",
        "## Recipe",
        "",
        "```yaml",
        recipe_text.rstrip(),
        "```",
        "",
    ]
    lines += _usage()
    return "\n".join(lines) + "\n"


def _models_table(plan: MergePlan) -> list[str]:
    rows = ["| model | revision | role | parameters |", "|---|---|---|---|"]
    base = plan.recipe.base_model
    params = _model_params(plan)
    for ref, model in zip(plan.refs, plan.models):
        commit = model.source.commit or "local"
        role = "base" if ref == base else "input"
        rows.append(f"| `{ref.path}` | {commit} | {role} | {params.get(str(ref), '')} |")
    return rows


def _model_params(plan: MergePlan) -> dict[str, str]:
    out: dict[str, str] = {}
    entries: Sequence[Any] = [
        entry
        for part in parts(plan.recipe)
        for entry in [*(part.models or []), *(s for sl in part.slices or [] for s in sl.sources)]
    ]
    for entry in entries:
        if entry.parameters:
            text = ", ".join(f"{k}: {to_plain(v)}" for k, v in entry.parameters.items())
            out.setdefault(str(entry.model), text)
    return out


def _usage() -> list[str]:
    return [
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        'model = AutoModelForCausalLM.from_pretrained("path/or/repo-of-this-model")',
        'tokenizer = AutoTokenizer.from_pretrained("path/or/repo-of-this-model")',
        "```",
    ]
