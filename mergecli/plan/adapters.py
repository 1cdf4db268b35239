"""Model references with LoRA adapters resolved into the models they stand for.

`BASE+ADAPTER` folds the adapter into the model named before the `+`; a reference to an
adapter folder or repo alone folds it into the recipe's `base_model`, else into the base its
`adapter_config.json` names. Either way the adapter's declared base must match the one it is
folded into, and its shapes must fit that base's headers, before any weight is read.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from mergecli.errors import IncompatibleModelError, NotFoundError
from mergecli.io.adapter import Adapter, fold_view, is_adapter, read_adapter, same_base
from mergecli.io.checkpoint import ModelInfo, load_model_info
from mergecli.io.dequant import dequantized_view
from mergecli.io.source import ModelSource, resolve_source
from mergecli.recipe.schema import ModelRef, parse_model_ref

Plain = Callable[[ModelRef], ModelInfo]


def model_resolver(recipe_dir: Path | None, recipe_base: ModelRef | None = None) -> Plain:
    """Resolve references (adapters included) to models; each plain model is read once, so a
    base shared by several adapters is one model with one set of open files."""
    plain: dict[ModelRef, ModelInfo] = {}

    def load(ref: ModelRef, source: ModelSource | None = None) -> ModelInfo:
        if ref not in plain:
            found = source or resolve_source(ref, recipe_dir)
            plain[ref] = dequantized_view(load_model_info(found))
        return plain[ref]

    def resolve(ref: ModelRef) -> ModelInfo:
        if ref.adapter:
            base = ModelRef(path=ref.path, revision=ref.revision)
            adapter = _adapter_at(_adapter_ref(ref.adapter), recipe_dir)
            return _folded(adapter, base, load, str(ref), recipe_dir)
        source = resolve_source(ref, recipe_dir)
        if not is_adapter(source):
            return load(ref, source)
        adapter = read_adapter(source)
        into = recipe_base if recipe_base is not None and recipe_base != ref else None
        return _folded(adapter, into or _declared(adapter, ref), load, str(ref), recipe_dir)

    return resolve


def _adapter_ref(text: str) -> ModelRef:
    return ModelRef(**parse_model_ref(text))


def _adapter_at(ref: ModelRef, recipe_dir: Path | None) -> Adapter:
    source = resolve_source(ref, recipe_dir)
    if not is_adapter(source):
        raise NotFoundError(
            f"{ref}: not a PEFT adapter (no adapter_config.json beside its weights)",
            hint="after `+` name the folder or repo PEFT's `save_pretrained` wrote",
        )
    return read_adapter(source)


def _declared(adapter: Adapter, ref: ModelRef) -> ModelRef:
    declared = adapter.settings.base
    if declared is None:
        raise NotFoundError(
            f"{ref}: the adapter names no base model (no base_model_name_or_path) and the "
            "recipe has no base_model",
            hint=f"write the base before the adapter: `BASE+{ref}`",
        )
    return ModelRef(path=declared, revision=adapter.settings.revision)


def _folded(
    adapter: Adapter, base: ModelRef, load: Plain, label: str, recipe_dir: Path | None
) -> ModelInfo:
    declared = adapter.settings.base
    if not same_base(declared, base.path, recipe_dir):
        raise IncompatibleModelError(
            f"{adapter.label} was trained on `{declared}`, but the recipe folds it into `{base}`",
            hint="fold it into the base it names (`base_model`, or `BASE+ADAPTER`), or check "
            "that this is the adapter you meant",
        )
    return fold_view(load(base), adapter, label)
