"""PEFT LoRA adapters as inputs: an adapter's config and tensors read, checked against its
base's headers, and turned into the model it stands for (the base with the adapter folded
in on read, `mergecli.io.fold`). Only configs and headers are read here, never weights.

An adapter folder holds `adapter_config.json` and `adapter_model.safetensors` (or
`adapter_model.bin`, loaded with `weights_only=True`). Its tensors are named after the
modules of the PEFT-wrapped model: `base_model.model.<module>.lora_A.weight`,
`.lora_B.weight` (`.lora_B.bias` with `lora_bias`), `.lora_embedding_A`/`_B` for embeddings,
`.lora_magnitude_vector` for DoRA, `<module>.base_layer.weight` for embeddings PEFT saved
whole, and plain `<tensor>` names for `modules_to_save`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from mergecli.errors import CorruptFileError, IncompatibleModelError
from mergecli.io.checkpoint import Fold, ModelInfo, TensorInfo, load_bin, safetensors_tensors
from mergecli.io.dtypes import TORCH_TO_CODE
from mergecli.io.jsonfile import read_json_object
from mergecli.io.source import ModelSource

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_SAFETENSORS = "adapter_model.safetensors"
ADAPTER_BIN = "adapter_model.bin"
PREFIX = "base_model.model."

# settings of a LoRA config that change nothing about its weights once trained (or that
# mergecli reads below); a PEFT setting outside this list that is set is refused, since
# mergecli cannot know how it changes the weights
_KNOWN = {
    "alpha_pattern", "auto_mapping", "base_model_name_or_path", "bias", "corda_config",
    "ensure_weight_tying", "eva_config", "exclude_modules", "fan_in_fan_out",
    "inference_mode", "init_lora_weights", "layers_pattern", "layers_to_transform",
    "loftq_config", "lora_alpha", "lora_bias", "lora_dropout", "lora_ga_config",
    "megatron_core", "modules_to_save", "peft_type", "peft_version", "qalora_group_size",
    "r", "rank_pattern", "revision", "target_modules", "task_type", "use_dora",
    "use_rslora", "use_qalora",
}  # fmt: skip
_FALSE_ONLY = ("use_qalora",)


@dataclass(frozen=True)
class LoraSettings:
    """What of an adapter's `adapter_config.json` decides its folded weights."""

    r: int
    alpha: float
    rslora: bool
    dora: bool
    fan_in_fan_out: bool
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    base: str | None
    revision: str | None

    def scale(self, module: str) -> tuple[int, float]:
        """The rank and scaling PEFT gives `module` (a module name in the base model):
        `alpha / r`, or `alpha / sqrt(r)` with rsLoRA; patterns match a name's tail."""
        r = self.rank_pattern.get(pattern_key(self.rank_pattern, module), self.r)
        alpha = self.alpha_pattern.get(pattern_key(self.alpha_pattern, module), self.alpha)
        return r, alpha / math.sqrt(r) if self.rslora else alpha / r


@dataclass(frozen=True)
class Adapter:
    """A LoRA adapter: its settings and its tensors (as a model of its own)."""

    label: str
    settings: LoraSettings
    weights: ModelInfo


def pattern_key(patterns: dict[str, Any], module: str) -> str:
    """The first pattern that matches the end of `module` at a name boundary (PEFT's rule
    for `rank_pattern` and `alpha_pattern`), else `module` itself."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return module


def is_adapter(source: ModelSource) -> bool:
    """True for a folder or repo holding a PEFT adapter rather than a model."""
    files = set(source.files())
    return ADAPTER_CONFIG in files and "config.json" not in files


def read_adapter(source: ModelSource) -> Adapter:
    """The adapter in `source`: its config checked (LoRA only; every setting understood)
    and its tensors indexed from the header (or the `.bin` loaded safely)."""
    config = read_json_object(source.local(ADAPTER_CONFIG), source.label)
    settings = _settings(source.label, config)
    files = set(source.files())
    if ADAPTER_SAFETENSORS in files:
        tensors = safetensors_tensors(source, [ADAPTER_SAFETENSORS])
        fmt: Literal["safetensors", "bin"] = "safetensors"
    elif ADAPTER_BIN in files:
        tensors, fmt = _bin_tensors(source), "bin"
    else:
        raise CorruptFileError(
            f"{source.label}: has {ADAPTER_CONFIG} but no {ADAPTER_SAFETENSORS} or {ADAPTER_BIN}",
            hint="point at the folder PEFT's `save_pretrained` wrote",
        )
    return Adapter(source.label, settings, ModelInfo(source.label, source, config, tensors, fmt))


def _bin_tensors(source: ModelSource) -> dict[str, TensorInfo]:
    tensors = {}
    for name, tensor in load_bin(source.local(ADAPTER_BIN), source.label).items():
        code = TORCH_TO_CODE.get(tensor.dtype)
        if code is None:
            raise CorruptFileError(f"{source.label}: `{name}` has unsupported dtype {tensor.dtype}")
        tensors[name] = TensorInfo(name, ADAPTER_BIN, code, tuple(tensor.shape))
    return tensors


def _settings(label: str, config: dict[str, Any]) -> LoraSettings:
    kind = config.get("peft_type")
    if kind != "LORA":
        raise IncompatibleModelError(
            f"{label} is a PEFT {kind or 'unknown-type'} adapter; mergecli folds LoRA adapters "
            "(plain, rsLoRA, DoRA) only",
            hint="merge it with PEFT (`merge_and_unload`) and reference the merged folder",
        )
    for key, value in config.items():
        if value and (key not in _KNOWN or key in _FALSE_ONLY):
            raise IncompatibleModelError(
                f"{label}: adapter setting `{key}: {value!r}` is not supported; mergecli folds "
                "plain LoRA, rsLoRA and DoRA adapters",
                hint="merge it with PEFT (`merge_and_unload`) and reference the merged folder",
            )
    try:
        return LoraSettings(
            r=_positive_int(config.get("r", 8)),
            alpha=float(config.get("lora_alpha", 8)),
            rslora=bool(config.get("use_rslora")),
            dora=bool(config.get("use_dora")),
            fan_in_fan_out=bool(config.get("fan_in_fan_out")),
            rank_pattern={str(k): _positive_int(v) for k, v in _mapping(config, "rank_pattern")},
            alpha_pattern={str(k): float(v) for k, v in _mapping(config, "alpha_pattern")},
            base=_text(config.get("base_model_name_or_path")),
            revision=_text(config.get("revision")),
        )
    except (TypeError, ValueError) as exc:
        raise CorruptFileError(
            f"{label}: {ADAPTER_CONFIG} is not a valid LoRA config ({exc})"
        ) from None


def _positive_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"a rank must be a positive integer, found {value!r}")
    return value


def _mapping(config: dict[str, Any], key: str) -> list[tuple[Any, Any]]:
    value = config.get(key) or {}
    if not isinstance(value, dict):
        raise ValueError(f"`{key}` must be a mapping, found {value!r}")
    return list(value.items())


def _text(value: Any) -> str | None:
    return value.strip() or None if isinstance(value, str) else None


def declared_base(adapter: Adapter) -> str | None:
    """The base model the adapter was trained on, as `adapter_config.json` names it."""
    return adapter.settings.base


def same_base(declared: str | None, path: str, where: Path | None) -> bool:
    """Whether an adapter's declared base (`base_model_name_or_path`) names the model at
    `path`: the same text (Hub ids ignore case), the same folder, or the same last name
    (`org/Llama-3-8B` trained, a local copy `/models/Llama-3-8B` used). No declared base
    matches anything (the shapes are still checked)."""
    if not declared:
        return True

    def tail(text: str) -> str:
        return text.rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1].lower()

    def folder(text: str) -> Path | None:
        candidate = Path(text).expanduser()
        if not candidate.is_absolute() and where is not None and not candidate.exists():
            candidate = where / candidate
        return candidate.resolve() if candidate.is_dir() else None

    if declared.rstrip("/").lower() == path.rstrip("/").lower() or tail(declared) == tail(path):
        return True
    found = folder(declared)
    return found is not None and found == folder(path)


def fold_view(base: ModelInfo, adapter: Adapter, label: str) -> ModelInfo:
    """`base` with `adapter` applied: each tensor the adapter changes gets a `Fold`, shapes
    checked against the base's headers (IncompatibleModelError when they do not fit)."""
    tensors = dict(base.tensors)
    modules = _modules(adapter)
    for module, parts in sorted(modules.items()):
        for name, fold in _folds(base, adapter, module, parts):
            tensors[name] = replace(base.tensors[name], fold=fold)
    return replace(base, label=label, tensors=tensors)


_LORA_PARTS = re.compile(
    r"^(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_embedding_A"
    r"|lora_embedding_B|lora_magnitude_vector(?:\.weight)?|base_layer\.weight|base_layer\.bias)$"
)


def _modules(adapter: Adapter) -> dict[str, dict[str, str]]:
    """Per module: its LoRA parts (`lora_A.weight`, ...) to tensor names; a full tensor
    (modules_to_save) is the module `""` part of its own name."""
    modules: dict[str, dict[str, str]] = {}
    for name in adapter.weights.tensors:
        short = name.removeprefix(PREFIX)
        found = _LORA_PARTS.match(short)
        if found is None:
            modules.setdefault(short, {})["full"] = name
            continue
        part = (
            found["part"].removesuffix(".weight") if "magnitude" in found["part"] else found["part"]
        )
        modules.setdefault(found["module"], {})[part] = name
    return modules


def _folds(
    base: ModelInfo, adapter: Adapter, module: str, parts: dict[str, str]
) -> list[tuple[str, Fold]]:
    weights = adapter.weights
    if "base_layer.bias" in parts:  # `bias: lora_only`/`all`: the trained bias, saved whole
        rest = {k: v for k, v in parts.items() if k != "base_layer.bias"}
        target = _base_name(base, adapter, f"{module}.bias")
        whole = (target, _replacement(base, adapter, target, parts["base_layer.bias"]))
        return [whole, *(_folds(base, adapter, module, rest) if rest else [])]
    if "full" in parts:
        target = _base_name(base, adapter, module)
        return [(target, _replacement(base, adapter, target, parts["full"]))]
    if "base_layer.weight" in parts and len(parts) == 1:
        target = _base_name(base, adapter, f"{module}.weight")
        return [(target, _replacement(base, adapter, target, parts["base_layer.weight"]))]
    embedding = "lora_embedding_A" in parts
    a = parts.get("lora_embedding_A" if embedding else "lora_A.weight")
    b = parts.get("lora_embedding_B" if embedding else "lora_B.weight")
    if a is None or b is None:
        raise CorruptFileError(
            f"{adapter.label}: module `{module}` has {', '.join(sorted(parts))} but not both "
            "LoRA matrices A and B",
            hint="the adapter file is incomplete; save it again with PEFT",
        )
    target = _base_name(base, adapter, f"{module}.weight")
    info = base.tensors[target]
    saved = parts.get("base_layer.weight")  # PEFT saves a LoRA'd embedding's base whole
    if saved is not None:
        info = _replacement(base, adapter, target, saved).base
    r, scale = adapter.settings.scale(module)
    shape_a, shape_b = weights.tensors[a].shape, weights.tensors[b].shape
    transposed = _orientation(adapter, target, info.shape, shape_a, shape_b, r, embedding)
    magnitude = parts.get("lora_magnitude_vector")
    if magnitude is not None:
        want = info.shape[1] if transposed else info.shape[0]
        if weights.tensors[magnitude].shape != (want,):
            found = f"a DoRA magnitude of shape {list(weights.tensors[magnitude].shape)}"
            raise _misfit(adapter, target, found, info.shape)
    fold = Fold(weights, info, a, b, scale, transposed, magnitude, base_in_adapter=bool(saved))
    folds = [(target, fold)]
    if "lora_B.bias" in parts:
        bias = _base_name(base, adapter, f"{module}.bias")
        if weights.tensors[parts["lora_B.bias"]].shape != base.tensors[bias].shape:
            raise _misfit(adapter, bias, "a LoRA bias", base.tensors[bias].shape)
        folds.append((bias, Fold(weights, base.tensors[bias], b=parts["lora_B.bias"], scale=scale)))
    return folds


def _orientation(
    adapter: Adapter,
    target: str,
    shape: tuple[int, ...],
    shape_a: tuple[int, ...],
    shape_b: tuple[int, ...],
    r: int,
    embedding: bool,
) -> bool:
    """Whether the delta `B @ A` is stored transposed in the base (Conv1D, embeddings);
    the config's `fan_in_fan_out` decides only for square matrices."""
    if len(shape_a) != 2 or len(shape_b) != 2 or shape_a[0] != r or shape_b[1] != r:
        raise CorruptFileError(
            f"{adapter.label}: the LoRA matrices of `{target}` have shapes {list(shape_a)} and "
            f"{list(shape_b)}, which do not form a rank-{r} update",
            hint="the adapter's config (r, rank_pattern) does not describe its tensors",
        )
    delta = (shape_b[0], shape_a[1])
    flipped = (delta[1], delta[0])
    if embedding and shape == flipped:
        return True
    if (
        not embedding
        and shape == delta
        and (delta != flipped or not adapter.settings.fan_in_fan_out)
    ):
        return False
    if not embedding and shape == flipped:
        return True
    raise _misfit(adapter, target, f"a LoRA update of shape {list(delta)}", shape)


def _misfit(
    adapter: Adapter, target: str, what: str, shape: tuple[int, ...]
) -> IncompatibleModelError:
    return IncompatibleModelError(
        f"{adapter.label}: {what} does not fit `{target}` of shape {list(shape)}",
        hint="is this the base model the adapter was trained on?",
    )


def _replacement(base: ModelInfo, adapter: Adapter, target: str, name: str) -> Fold:
    own = _adapter_info(adapter, name)
    if own.shape != base.tensors[target].shape:
        raise IncompatibleModelError(
            f"{adapter.label}: its saved `{target}` has shape {list(own.shape)}, the base's "
            f"{list(base.tensors[target].shape)}",
            hint="adapters trained with a resized vocabulary are not supported yet; merge it "
            "with PEFT (`merge_and_unload`) and reference the merged folder",
        )
    return Fold(adapter.weights, own, replace=name)


def _adapter_info(adapter: Adapter, name: str) -> TensorInfo:
    return adapter.weights.tensors[name]


def _base_name(base: ModelInfo, adapter: Adapter, name: str) -> str:
    """The base tensor an adapter's module tensor names: the same name, else the name
    without (or with) a leading `model.`, as checkpoints of one architecture differ."""
    for candidate in (name, name.removeprefix("model."), f"model.{name}"):
        if candidate in base.tensors:
            return candidate
    tied = name.startswith("lm_head") and bool(base.config.get("tie_word_embeddings"))
    hint = (
        "the base ties its LM head to the embeddings; mergecli cannot fold a LoRA on a tied head"
        if tied
        else "is this the base model the adapter was trained on?"
    )
    raise IncompatibleModelError(
        f"{adapter.label} changes `{name}`, which {base.label} does not have", hint=hint
    )
