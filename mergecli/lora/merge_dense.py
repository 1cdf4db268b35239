"""`output: {kind: adapter, rank: R}`: any merge method over adapters of one base, its
result's change from the base factored back to a rank-R LoRA adapter by truncated SVD,
with each tensor's relative reconstruction error reported.

Each tensor is merged in its work dtype (float32), never cast before factoring: the cast
to bf16 would bury a small delta under the rounding of the weight it is added to.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mergecli.engine.compute import compute_tensor
from mergecli.io.adapter import PREFIX
from mergecli.io.checkpoint import Fold
from mergecli.io.reader import TensorReader
from mergecli.lora.factor import factor
from mergecli.lora.write import AppendingSafetensors, merged_config, write_config
from mergecli.plan.types import MergePlan, TensorPlan


@dataclass(frozen=True)
class Factored:
    """One output tensor: factored (`rank`, `error`) or saved whole (`rank` None)."""

    name: str
    rank: int | None
    error: float | None


def _fold_of(plan: MergePlan, tensor: TensorPlan) -> Fold | None:
    """A LoRA fold of `tensor` in some input (its layout is the same in every adapter)."""
    for ref in tensor.inputs:
        found = plan.models[ref.model].tensors[ref.name].fold
        if found is not None and found.a is not None:
            return found
    return None


def write_dense_adapter(plan: MergePlan, folder: Path) -> tuple[dict[str, Any], list[Factored]]:
    """Merge, factor and write the adapter into `folder`; the config and the report."""
    spec = plan.recipe.output
    assert spec is not None and spec.rank is not None
    reader = TensorReader(plan.models)
    weights = AppendingSafetensors(folder / "adapter_model.safetensors")
    report: list[Factored] = []
    targets, saved = [], []
    try:
        for tensor in plan.tensors:
            assert tensor.base is not None, "an adapter output has a base_model"
            merged = compute_tensor(plan, tensor, reader, cast=False).tensor.to(torch.float32)
            base = reader.read(plan.models[tensor.base.model], tensor.base.name).to(torch.float32)
            delta = merged - base
            if not bool(delta.any()):
                continue
            fold = _fold_of(plan, tensor)
            dtype = base.dtype if tensor.dtype == "F32" else torch.bfloat16
            if fold is None or delta.dim() != 2:
                weights.add(PREFIX + tensor.name, merged.to(dtype))
                saved.append(tensor.name.rpartition(".")[0])
                report.append(Factored(tensor.name, None, None))
                continue
            module = (fold.a or "").removeprefix(PREFIX).rsplit(".lora_", 1)[0]
            found = factor(delta.T if fold.transposed else delta, rank=spec.rank)
            embedding = "lora_embedding_A" in (fold.a or "")
            names = (
                ("lora_embedding_A", "lora_embedding_B")
                if embedding
                else ("lora_A.weight", "lora_B.weight")
            )
            weights.add(f"{PREFIX}{module}.{names[0]}", found.a.to(dtype))
            weights.add(f"{PREFIX}{module}.{names[1]}", found.b.to(dtype))
            targets.append(module)
            report.append(Factored(tensor.name, found.rank, found.error))
    finally:
        reader.close()
    weights.close()
    config = merged_config(plan.models, spec.rank, targets, saved)
    write_config(folder, config)
    return config, report
