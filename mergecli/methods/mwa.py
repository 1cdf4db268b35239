"""Metrics-weighted averaging of checkpoints of one training run."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from mergecli.methods.spec import MergeArgs, MethodSpec, ParamSpec


def last_metric(state: Mapping[str, Any] | None, metric: str) -> float | None:
    """The last value of `metric` logged in a `trainer_state.json` (`log_history`)."""
    history = (state or {}).get("log_history") or []
    values = [
        entry[metric]
        for entry in history
        if isinstance(entry, dict) and isinstance(entry.get(metric), (int, float))
    ]
    return float(values[-1]) if values else None


def mwa_weights(
    states: Sequence[Mapping[str, Any] | None], params: Mapping[str, Any]
) -> list[dict[str, Any]]:
    """w_i = exp(-penalty * metric_i) / sum_j exp(-penalty * metric_j), as a stable softmax.

    `metric: step` with a negative penalty favours later checkpoints.
    """
    metric, penalty = str(params["metric"]), float(params["penalty"])
    values = [last_metric(state, metric) for state in states]
    missing = [i for i, v in enumerate(values) if v is None]
    if missing:
        raise ValueError(
            f"no `{metric}` in the log_history of trainer_state.json for input(s) {missing}"
        )
    exponents = [-penalty * v for v in values if v is not None]
    top = max(exponents)
    raw = [math.exp(e - top) for e in exponents]
    total = sum(raw)
    return [{"weight": r / total} for r in raw]


def mwa(args: MergeArgs) -> torch.Tensor:
    """sum_i w_i W_i with the weights computed from each checkpoint's metric at plan time."""
    out = torch.zeros_like(args.tensors[0])
    for params, tensor in zip(args.per_model, args.tensors):
        out.add_(tensor, alpha=float(params["weight"]))
    return out


SPEC = MethodSpec(
    "mwa",
    mwa,
    "Average checkpoints weighted by exp(-penalty * metric) from their trainer_state.json.",
    (
        ParamSpec(
            "penalty",
            "float",
            "global",
            "penalty factor p in exp(-p * metric)",
            default=1.0,
        ),
        ParamSpec(
            "metric",
            "str",
            "global",
            "the log_history key to weight by (last value)",
            default="loss",
        ),
    ),
    min_models=2,
    data="checkpoint metrics",
    paper="https://arxiv.org/abs/2504.18580",
    reads="trainer_state.json",
    prepare=mwa_weights,
    elementwise=True,
)
