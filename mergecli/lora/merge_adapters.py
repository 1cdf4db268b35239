"""`output: {kind: adapter, combination: ...}`: the recipe's adapters (all of its base)
merged module by module into one PEFT LoRA adapter (`mergecli.lora.combine`)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mergecli.errors import IncompatibleModelError, Problem, RecipeError
from mergecli.io.adapter import PREFIX
from mergecli.io.checkpoint import Fold, ModelInfo
from mergecli.io.reader import TensorReader
from mergecli.lora.combine import combined, factor_weights
from mergecli.lora.factor import factor
from mergecli.lora.write import AppendingSafetensors, merged_config, write_config
from mergecli.plan.types import MergePlan
from mergecli.recipe.schema import OutputSpec


@dataclass(frozen=True)
class Part:
    """One adapter's LoRA on one module, with the recipe's weight for that adapter."""

    weight: float
    fold: Fold

    @property
    def rank(self) -> int:
        """Its rank."""
        assert self.fold.a is not None
        return int(self.fold.adapter.tensors[self.fold.a].shape[0])


def adapter_inputs(plan: MergePlan) -> list[tuple[ModelInfo, float]]:
    """The recipe's models with their `weight`, each checked to be a plain LoRA adapter of
    the recipe's base."""
    base = plan.recipe.base_model
    assert base is not None and plan.recipe.models
    found = []
    for i, entry in enumerate(plan.recipe.models):
        model = plan.models[plan.refs.index(entry.model)]
        where = f"models[{i}].model"
        folds = [t.fold for t in model.tensors.values() if t.fold is not None]
        index = plan.refs.index(entry.model)
        weights = {
            t.per_model[j].get("weight", 1.0)
            for t in plan.tensors
            for j, r in enumerate(t.inputs)
            if r.model == index and j < len(t.per_model)
        }
        if not folds or model.source is not plan.models[plan.refs.index(base)].source:
            raise RecipeError(
                [
                    Problem(
                        where,
                        f"`{entry.model}` is not a LoRA adapter of the base `{base}`",
                        "an adapter output merges adapters of `base_model`",
                    )
                ]
            )
        odd = next((f for f in folds if f.a is None or f.magnitude is not None), None)
        if odd is not None:
            what = "DoRA" if odd.magnitude is not None else "modules_to_save or trained biases"
            raise RecipeError(
                [
                    Problem(
                        where,
                        f"`{entry.model}` has {what}, which PEFT's combinations do not merge",
                        "merge it into a full model instead (`output: {kind: model}`)",
                    )
                ]
            )
        if len(weights) != 1:
            raise RecipeError(
                [
                    Problem(
                        f"models[{i}].parameters.weight",
                        "an adapter output takes one number per adapter as `weight` (no "
                        "gradients or filters)",
                        "write a plain number",
                    )
                ]
            )
        found.append((model, float(weights.pop())))
    return found


def modules(inputs: list[tuple[ModelInfo, float]]) -> Iterator[tuple[str, str, list[Part]]]:
    """(module, tensor name in the base, the adapters' parts) for every module some
    adapter changes, in the base's tensor order."""
    names = list(
        dict.fromkeys(n for model, _ in inputs for n, t in model.tensors.items() if t.fold)
    )
    for name in names:
        parts = []
        for model, weight in inputs:
            fold = model.tensors[name].fold
            if fold is not None:
                parts.append(Part(weight, fold))
        first = parts[0].fold
        assert first.a is not None
        module = first.a.removeprefix(PREFIX).rsplit(".lora_", 1)[0]
        yield module, name, parts


def new_rank(
    spec: OutputSpec, inputs: list[tuple[ModelInfo, float]], parts_of: list[list[Part]]
) -> int:
    """The merged adapter's rank, by PEFT's rule for the combination."""
    ranks = sorted({p.rank for parts in parts_of for p in parts})
    combination = spec.combination or ""
    if combination == "cat":
        return max(sum(p.rank for p in parts) for parts in parts_of)
    if combination.endswith("svd"):
        return spec.svd_rank or max(ranks)
    if len(ranks) != 1:
        raise IncompatibleModelError(
            f"combination `{combination}` combines the A and B matrices entry by entry, so the "
            f"adapters must have one rank; found ranks {ranks}",
            hint="use `cat` or an `*_svd` combination for adapters of different ranks",
        )
    return ranks[0]


def merge_module(
    parts: list[Part], spec: OutputSpec, rank: int, reader: TensorReader, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """The merged module's A and B (in PEFT's layouts), padded with zeros to `rank`."""
    combination = spec.combination
    assert combination is not None
    a_list = [_read(reader, p.fold, p.fold.a) for p in parts]
    b_list = [_read(reader, p.fold, p.fold.b) for p in parts]
    density, method = spec.density if spec.density is not None else 1.0, spec.majority_sign_method
    if combination == "cat":
        a = torch.cat([x * p.weight * p.fold.scale for x, p in zip(a_list, parts)])
        b = torch.cat(b_list, dim=1)
    elif combination.endswith("svd"):
        deltas = [(y @ x) * p.fold.scale for x, y, p in zip(a_list, b_list, parts)]
        kind = "linear" if combination == "svd" else combination.removesuffix("_svd")
        merged = combined(deltas, [p.weight for p in parts], kind, density, method, generator)
        found = factor(merged, rank=rank, solver="exact")
        a, b = found.a, found.b
    else:
        weights = [factor_weights(p.weight, p.fold.scale) for p in parts]
        a = combined(a_list, [w for w, _ in weights], combination, density, method, generator)
        b = combined(b_list, [w for _, w in weights], combination, density, method, generator)
    return _padded(a, rank, 0), _padded(b, rank, 1)


def _read(reader: TensorReader, fold: Fold, name: str | None) -> torch.Tensor:
    assert name is not None
    return reader.read(fold.adapter, name).to(torch.float32)


def _padded(tensor: torch.Tensor, rank: int, dim: int) -> torch.Tensor:
    missing = rank - tensor.shape[dim]
    if missing <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor, tensor.new_zeros(shape)], dim=dim)


def write_adapter_merge(plan: MergePlan, folder: Path, seed: int) -> dict[str, Any]:
    """Merge the plan's adapters into `folder` (adapter_model.safetensors, config); return
    the config written."""
    spec = plan.recipe.output
    assert spec is not None and spec.combination is not None
    inputs = adapter_inputs(plan)
    found = list(modules(inputs))
    rank = new_rank(spec, inputs, [parts for _, _, parts in found])
    reader = TensorReader([m for m, _ in inputs])
    generator = torch.Generator().manual_seed(seed)
    weights = AppendingSafetensors(folder / "adapter_model.safetensors")
    targets = []
    try:
        for module, _, parts in found:
            a, b = merge_module(parts, spec, rank, reader, generator)
            embedding = "lora_embedding_A" in (parts[0].fold.a or "")
            dtype = reader.read(parts[0].fold.adapter, parts[0].fold.a or "").dtype
            names = (
                ("lora_embedding_A", "lora_embedding_B")
                if embedding
                else ("lora_A.weight", "lora_B.weight")
            )
            weights.add(f"{PREFIX}{module}.{names[0]}", a.to(dtype))
            weights.add(f"{PREFIX}{module}.{names[1]}", b.to(dtype))
            targets.append(module)
    finally:
        reader.close()
    weights.close()
    config = merged_config([m for m, _ in inputs], rank, targets)
    write_config(folder, config)
    return config
