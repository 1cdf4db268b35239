"""`mergecli plan`: what would be computed, without reading weights."""

from __future__ import annotations

import json
from typing import Any

from rich.table import Table

from mergecli.cli._common import plan_recipe
from mergecli.cli._console import stdout_console
from mergecli.cli._options import JsonOpt, RecipeArg, SeedOpt, ShardSizeOpt, StrictOpt
from mergecli.engine.memory import budget_for, predict_peak
from mergecli.io.dtypes import CODE_TO_NAME
from mergecli.plan.types import MergePlan, TensorPlan
from mergecli.units import format_size

T_NOTE = (
    "gradients: layer tensors get t = i/(L-1) within their slice; tensors before the layers "
    "(embeddings) and after them (final norm, head) get t = 0, as in mergekit"
)


def plan_to_dict(plan: MergePlan) -> dict[str, Any]:
    """The plan as JSON-ready data."""
    return {
        "method": plan.method.name,
        "models": [
            {"ref": str(r), "commit": m.source.commit, "bytes": m.total_bytes}
            for r, m in zip(plan.refs, plan.models)
        ],
        "bytes_to_read": plan.read_bytes,
        "bytes_to_write": plan.total_bytes,
        "predicted_peak_bytes": predict_peak(plan, budget_for(plan, None)),
        "shards": list(plan.shard_names),
        "seed": plan.seed,
        "vocabulary": None
        if plan.vocab is None
        else {
            "tokens": len(plan.vocab.tokens),
            "added_by_union": len(plan.vocab.new_tokens),
            "rows": plan.vocab.rows,
        },
        "notes": [*plan.notes, T_NOTE],
        "tensors": [_tensor(plan, t) for t in plan.tensors],
    }


def _tensor(plan: MergePlan, tensor: TensorPlan) -> dict[str, Any]:
    return {
        "name": tensor.name,
        "shape": list(tensor.shape),
        "dtype": CODE_TO_NAME[tensor.dtype],
        "shard": plan.shard_names[tensor.shard],
        "op": "copy" if tensor.copy else plan.method.name,
        "layer": tensor.layer,
        "t": tensor.t,
        "inputs": [
            {
                "model": str(plan.refs[r.model]),
                "tensor": r.name,
                "fold": _fold(plan, r.model, r.name),
            }
            for r in tensor.inputs
        ],
        "base": None
        if tensor.base is None
        else {"model": str(plan.refs[tensor.base.model]), "tensor": tensor.base.name},
        "params": dict(tensor.params),
        "per_model": [dict(p) for p in tensor.per_model],
        "rows_reindexed": tensor.vocab_names is not None,
    }


def _fold(plan: MergePlan, model: int, name: str) -> dict[str, Any] | None:
    """How an adapter changes this input as it is read (None: read as stored)."""
    found = plan.models[model].tensors[name].fold
    if found is None:
        return None
    if found.replace is not None:
        return {"adapter": found.adapter.label, "kind": "replace", "tensor": found.replace}
    kind = "bias" if found.a is None else "dora" if found.magnitude else "lora"
    rank = None if found.a is None else found.adapter.tensors[found.a].shape[0]
    return {"adapter": found.adapter.label, "kind": kind, "rank": rank, "scale": found.scale}


def _input_label(row: dict[str, Any]) -> str:
    fold = row["fold"]
    if fold is None:
        return str(row["model"])
    rank = fold.get("rank")
    what = fold["kind"] if rank is None else f"{fold['kind']} r{rank}"
    return f"{row['model']} (+{what})"


def plan(
    recipe: RecipeArg,
    as_json: JsonOpt = False,
    shard_size: ShardSizeOpt = "5GB",
    seed: SeedOpt = None,
    strict: StrictOpt = False,
) -> None:
    """Show every output tensor with its method, inputs and resolved parameters.

    Also shows bytes to read and write, the shards, and predicted peak tensor memory.
    No weights are read.

    Example:

      mergecli plan recipes/quickstart.yaml --json
    """
    merge_plan = plan_recipe(recipe, shard_size, seed, strict)
    data = plan_to_dict(merge_plan)
    if as_json:
        print(json.dumps(data, indent=2))
        return
    console = stdout_console()
    table = Table(
        "tensor", "shape", "dtype", "op", "t", "inputs", "parameters", title=f"plan: {recipe}"
    )
    for row in data["tensors"]:
        params = {**row["params"]}
        if row["per_model"] and any(row["per_model"]):
            params["per_model"] = row["per_model"]
        table.add_row(
            row["name"],
            "x".join(map(str, row["shape"])),
            row["dtype"],
            row["op"],
            f"{row['t']:.3g}",
            ", ".join(_input_label(i) for i in row["inputs"])
            + (f" (base {row['base']['model']})" if row["base"] else ""),
            json.dumps(params) if params else "",
        )
    console.print(table)
    console.print(
        f"read {format_size(data['bytes_to_read'])}, write {format_size(data['bytes_to_write'])} "
        f"in {len(data['shards'])} shard(s); predicted peak memory "
        f"{format_size(data['predicted_peak_bytes'])}"
    )
    for note in data["notes"]:
        console.print(f"note: {note}")
