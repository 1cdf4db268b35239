"""Output shards: tensors assigned to files in order, HF shard names."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from mergecli.plan.types import TensorPlan

DEFAULT_SHARD_BYTES = 5 * 10**9


def shard_name(index: int, count: int) -> str:
    """HF shard file name: `model.safetensors` alone, else `model-00001-of-00003.safetensors`."""
    return (
        "model.safetensors" if count == 1 else f"model-{index + 1:05d}-of-{count:05d}.safetensors"
    )


def assign_shards(
    tensors: Sequence[TensorPlan], shard_bytes: int
) -> tuple[list[TensorPlan], tuple[str, ...]]:
    """Fill shards in order, starting a new one when the next tensor would overflow it."""
    shard, used, out = 0, 0, []
    for tensor in tensors:
        if used > 0 and used + tensor.nbytes > shard_bytes:
            shard, used = shard + 1, 0
        used += tensor.nbytes
        out.append(with_shard(tensor, shard))
    count = shard + 1
    return out, tuple(shard_name(i, count) for i in range(count))


def with_shard(tensor: TensorPlan, shard: int) -> TensorPlan:
    return replace(tensor, shard=shard)
