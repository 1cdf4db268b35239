"""`extract-lora`: a PEFT LoRA adapter that turns BASE into (nearly) TUNED, made one tensor at
a time: each LoRA-shaped weight's delta factored by truncated SVD (`factor`), every other
changed module saved whole (`modules_to_save`), the rest left out.

A module is LoRA-shaped when the model's own classes (built on the meta device from
config.json, never running remote code) make it an `nn.Linear`, a GPT-2 `Conv1D` (stored
transposed: `fan_in_fan_out`) or an `nn.Embedding`; without a known architecture, 2-D
`.weight` tensors are Linear and names with `embed`/`wte`/`wpe` are embeddings.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch

from mergecli.errors import IncompatibleModelError, UsageError
from mergecli.io.adapter import PREFIX
from mergecli.io.checkpoint import ModelInfo
from mergecli.io.dtypes import CODE_TO_TORCH, ITEMSIZE
from mergecli.io.reader import TensorReader
from mergecli.lora.factor import Factors, Matrix, RowMatrix, Solver, factor
from mergecli.lora.write import AppendingSafetensors

Kind = Literal["linear", "conv1d", "embedding", "other"]
_EMBEDDING_NAMES = re.compile(r"(?:^|\.)(?:embed\w*|wte|wpe|word_embeddings)$")


@dataclass(frozen=True)
class Options:
    """What to extract: a fixed `rank` or the `energy` to keep, module patterns, and
    whether embeddings and the LM head get LoRA pairs."""

    rank: int | None = None
    energy: float | None = None
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    embeddings: bool = False
    lm_head: bool = False
    solver: Solver = "auto"
    dtype: torch.dtype | None = None


@dataclass(frozen=True)
class Row:
    """One module of the report: what became of it."""

    module: str
    shape: tuple[int, ...]
    action: Literal["lora", "modules_to_save", "left out"]
    rank: int | None = None
    error: float | None = None
    note: str = ""


@dataclass
class Extracted:
    """The report and what the adapter config needs."""

    rows: list[Row] = field(default_factory=list)
    unchanged: int = 0
    conv1d: bool = False

    @property
    def biases(self) -> bool:
        """Whether some LoRA module's bias is saved whole (PEFT's `bias: lora_only`)."""
        return any(r.action == "lora" and r.note.startswith("bias") for r in self.rows)

    @property
    def targets(self) -> list[Row]:
        """The modules that got LoRA pairs."""
        return [r for r in self.rows if r.action == "lora"]


def module_kinds(model: ModelInfo) -> dict[str, Kind]:
    """Module name -> its kind, from the architecture's classes on the meta device when
    transformers knows the model type, else from tensor names and shapes."""
    kinds: dict[str, Kind] = {}
    found = _meta_kinds(model.config)
    for name, info in model.tensors.items():
        module = name.rpartition(".")[0]
        if module in found:
            kinds[module] = found[module]
        elif name.endswith(".weight") and len(info.shape) == 2:
            kinds[module] = "embedding" if _EMBEDDING_NAMES.search(module) else "linear"
        else:
            kinds.setdefault(module, "other")
    return kinds


def _meta_kinds(config: dict[str, Any]) -> dict[str, Kind]:
    try:
        from transformers import AutoConfig, AutoModelForCausalLM
        from transformers.pytorch_utils import Conv1D

        built = AutoConfig.for_model(**config)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(built, trust_remote_code=False)  # type: ignore[no-untyped-call]
    except Exception:  # an architecture transformers does not know: fall back to names
        return {}
    kinds: dict[str, Kind] = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Embedding):
            kinds[name] = "embedding"
        elif isinstance(module, Conv1D):
            kinds[name] = "conv1d"
        elif isinstance(module, torch.nn.Linear):
            kinds[name] = "linear"
    return kinds


def check_pair(tuned: ModelInfo, base: ModelInfo) -> None:
    """The two models must hold the same tensors with the same shapes."""
    missing = sorted(set(tuned.tensors) ^ set(base.tensors))
    if missing:
        raise IncompatibleModelError(
            f"{tuned.label} and {base.label} do not hold the same tensors (e.g. `{missing[0]}`, "
            f"{len(missing)} in all)",
            hint="extract-lora needs a fine-tune and the base it was tuned from",
        )
    for name, info in tuned.tensors.items():
        if info.shape != base.tensors[name].shape:
            raise IncompatibleModelError(
                f"`{name}` has shape {list(info.shape)} in {tuned.label} but "
                f"{list(base.tensors[name].shape)} in {base.label}",
                hint="extract-lora needs a fine-tune and the base it was tuned from",
            )


def extract(
    tuned: ModelInfo,
    base: ModelInfo,
    options: Options,
    weights: AppendingSafetensors,
    progress: Callable[[str], None] = lambda _: None,
) -> Extracted:
    """Factor or save every changed module of `tuned` into `weights`; the report."""
    check_pair(tuned, base)
    reader = TensorReader([tuned, base])
    kinds = module_kinds(base)
    report = Extracted()
    try:
        for module, names in _modules(tuned):
            progress(module)
            changed = {
                n: _delta(reader, tuned, base, n) for n in names if _changed(reader, tuned, base, n)
            }
            if not changed:
                report.unchanged += 1
                continue
            row = _one(
                module, names, kinds.get(module, "other"), changed, options, tuned, reader, weights
            )
            report.conv1d |= row.action == "lora" and kinds.get(module) == "conv1d"
            report.rows.append(row)
    finally:
        reader.close()
    return report


def _modules(model: ModelInfo) -> Iterator[tuple[str, list[str]]]:
    grouped: dict[str, list[str]] = {}
    for name in model.tensors:
        grouped.setdefault(name.rpartition(".")[0], []).append(name)
    yield from grouped.items()


HELD_BYTES = 64 << 20  # a delta larger than this in float32 is read in row chunks
CHUNK_BYTES = 16 << 20


def _row_chunks(shape: tuple[int, ...], itemsize: int) -> Iterator[tuple[int, int] | None]:
    if not shape or shape[0] == 0:
        yield None
        return
    row = max(1, itemsize * (math.prod(shape) // shape[0]))
    step = max(1, CHUNK_BYTES // row)
    for start in range(0, shape[0], step):
        yield (start, min(shape[0], start + step))


def _changed(reader: TensorReader, tuned: ModelInfo, base: ModelInfo, name: str) -> bool:
    """Whether `name` differs between the models, compared in row chunks as stored."""
    info = tuned.tensors[name]
    for rows in _row_chunks(info.shape, ITEMSIZE[info.dtype]):
        mine = reader.read(tuned, name, rows)
        theirs = reader.read(base, name, rows)
        if mine.dtype != theirs.dtype or not torch.equal(mine, theirs):
            return True
    return False


def _delta(reader: TensorReader, tuned: ModelInfo, base: ModelInfo, name: str) -> Matrix:
    """TUNED - BASE in float32: in memory, or as row chunks read when needed when the
    tensor is big and tall (an embedding, an LM head)."""
    shape = tuned.tensors[name].shape

    def rows(start: int, stop: int) -> torch.Tensor:
        found = reader.read(tuned, name, (start, stop)).to(torch.float32)
        return found.sub_(reader.read(base, name, (start, stop)).to(torch.float32))

    if len(shape) == 2 and 4 * math.prod(shape) > HELD_BYTES and shape[0] >= shape[1]:
        return RowMatrix((shape[0], shape[1]), rows)
    whole = reader.read(tuned, name).to(torch.float32)
    return whole.sub_(reader.read(base, name).to(torch.float32))


def _wanted(module: str, kind: Kind, options: Options) -> tuple[bool, str]:
    """Whether `module` may get a LoRA pair, else why not."""
    if options.include and not any(re.search(p, module) for p in options.include):
        return False, "not matched by --include"
    if any(re.search(p, module) for p in options.exclude):
        return False, "matched by --exclude"
    if kind == "embedding" and not options.embeddings:
        return False, "an embedding (--embeddings to extract it)"
    if module.split(".")[-1] == "lm_head" and not options.lm_head:
        return False, "the LM head (--lm-head to extract it)"
    return True, ""


def _one(
    module: str,
    names: list[str],
    kind: Kind,
    changed: dict[str, Matrix],
    options: Options,
    tuned: ModelInfo,
    reader: TensorReader,
    weights: AppendingSafetensors,
) -> Row:
    weight = f"{module}.weight"
    shape = tuned.tensors[names[0]].shape
    if kind != "other" and weight in changed:
        shape = tuned.tensors[weight].shape
        wanted, why = _wanted(module, kind, options)
        bias = f"{module}.bias"
        others = sorted(set(changed) - {weight, bias})
        if wanted and not others:
            row = _factored(module, kind, changed[weight], options, tuned, weights)
            if bias not in changed:
                return row
            stored = reader.read(tuned, bias)  # PEFT's `bias: lora_only`: saved whole
            weights.add(
                f"{PREFIX}{module}.base_layer.bias",
                stored.to(options.dtype) if options.dtype else stored,
            )
            return replace(row, note="bias changed: saved whole")
        if not wanted:
            return Row(module, shape, "left out", note=f"changed; {why}")
    for name in names:  # the whole module, as PEFT's modules_to_save holds it
        stored = reader.read(tuned, name)
        weights.add(PREFIX + name, stored.to(options.dtype) if options.dtype else stored)
    note = (
        "changed"
        if kind == "other"
        else f"{', '.join(n.rpartition('.')[2] for n in sorted(changed))} changed"
    )
    return Row(module, shape, "modules_to_save", note=note)


def _factored(
    module: str,
    kind: Kind,
    delta: Matrix,
    options: Options,
    tuned: ModelInfo,
    weights: AppendingSafetensors,
) -> Row:
    weight = f"{module}.weight"
    dtype = options.dtype or CODE_TO_TORCH[tuned.tensors[weight].dtype]
    # PEFT's update is B @ A in (out, in) layout; Conv1D and embeddings store its transpose
    transposed = kind in ("conv1d", "embedding")
    if isinstance(delta, RowMatrix):  # factored as stored, then transposed
        stored = factor(delta, options.rank, options.energy, options.solver)
        found = Factors(stored.a.T, stored.b.T, stored.error) if transposed else stored
    else:
        found = factor(
            delta.T if transposed else delta, options.rank, options.energy, options.solver
        )
    if kind == "embedding":
        weights.add(f"{PREFIX}{module}.lora_embedding_A", found.a.to(dtype))
        weights.add(f"{PREFIX}{module}.lora_embedding_B", found.b.to(dtype))
    else:
        weights.add(f"{PREFIX}{module}.lora_A.weight", found.a.to(dtype))
        weights.add(f"{PREFIX}{module}.lora_B.weight", found.b.to(dtype))
    return Row(module, tuple(delta.shape), "lora", found.rank, found.error)


def adapter_config(
    report: Extracted, options: Options, base: str, revision: str | None
) -> dict[str, Any]:
    """PEFT's config for the extracted adapter: scale 1 for every module (alpha = rank),
    per-module ranks in `rank_pattern`/`alpha_pattern`."""
    targets = report.targets
    ranks = [r.rank or 0 for r in targets]
    rank = options.rank if options.rank is not None else max(set(ranks), key=ranks.count)
    patterns = {r.module: r.rank for r in targets if r.rank != rank}
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "revision": revision,
        "r": rank,
        "lora_alpha": rank,
        "rank_pattern": patterns,
        "alpha_pattern": dict(patterns),
        "target_modules": sorted(r.module for r in targets),
        "modules_to_save": sorted(r.module for r in report.rows if r.action == "modules_to_save")
        or None,
        "fan_in_fan_out": report.conv1d,
        "lora_dropout": 0.0,
        "bias": "lora_only" if report.biases else "none",
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }


def nothing_changed(tuned: ModelInfo, base: ModelInfo) -> UsageError:
    """The error for two models with the same weights."""
    return UsageError(
        f"{tuned.label} and {base.label} have the same weights; there is nothing to extract",
        hint="check that TUNED is the fine-tune and --base its base",
    )
