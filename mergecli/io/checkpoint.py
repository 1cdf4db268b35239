"""A model's config and tensor index, built from configs and headers without reading weights."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import torch

from mergecli.errors import CorruptFileError, NotFoundError
from mergecli.io.dtypes import ITEMSIZE, TORCH_TO_CODE
from mergecli.io.jsonfile import read_json_object
from mergecli.io.source import ModelSource

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"


@dataclass(frozen=True)
class Packed:
    """A tensor stored quantized: its packed data and scale tensors, dequantized on read
    (`mergecli.io.dequant`); `block` is FP8's (rows, columns) per scale, None for one scale."""

    kind: Literal["fp8", "mxfp4"]
    data: TensorInfo
    scale: TensorInfo
    block: tuple[int, int] | None = None


@dataclass(frozen=True, eq=False)
class Fold:
    """A tensor of a base model with a LoRA adapter applied on read (`mergecli.io.fold`):
    the base tensor `base` plus `scale * B @ A` (transposed when `transposed`: GPT-2's
    Conv1D and embeddings), rescaled to DoRA's `magnitude` when it has one; with only `b`
    (a LoRA bias vector), the base plus `scale * b`; with `replace`, the adapter's own
    tensor (`modules_to_save`, saved embeddings). Names are tensors of `adapter`; so is
    `base` when `base_in_adapter` (an embedding PEFT saved whole beside its LoRA)."""

    adapter: ModelInfo
    base: TensorInfo
    a: str | None = None
    b: str | None = None
    scale: float = 1.0
    transposed: bool = False
    magnitude: str | None = None
    replace: str | None = None
    base_in_adapter: bool = False


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives and what it is (for a quantized tensor, its dequantized dtype
    and shape, with the stored tensors in `packed`; for a tensor with a LoRA adapter
    applied, the base tensor and adapter in `fold`)."""

    name: str
    file: str
    dtype: str
    shape: tuple[int, ...]
    packed: Packed | None = None
    fold: Fold | None = None

    @property
    def nbytes(self) -> int:
        """Size of the tensor's data in bytes."""
        return math.prod(self.shape) * ITEMSIZE[self.dtype]


@dataclass(frozen=True)
class ModelInfo:
    """One input model: its source, config and tensor index."""

    label: str
    source: ModelSource
    config: dict[str, Any]
    tensors: dict[str, TensorInfo]
    weight_format: Literal["safetensors", "bin", "gguf", "memory"]

    @property
    def total_bytes(self) -> int:
        """Bytes of all tensor data."""
        return sum(t.nbytes for t in self.tensors.values())


def stored_parts(model: ModelInfo, info: TensorInfo) -> list[tuple[tuple[str, str, str], int]]:
    """The stored tensors reading `info` of `model` reads, as (source, file, name) keys
    with their bytes: the tensor itself, or a fold's base tensor and adapter tensors (a
    base that several adapters fold into has one key)."""
    found = info.fold
    if found is None:
        return [((model.source.label, info.file, info.name), info.nbytes)]
    adapter = found.adapter
    names = [n for n in (found.a, found.b, found.magnitude, found.replace) if n is not None]
    parts = [
        ((adapter.source.label, adapter.tensors[n].file, n), adapter.tensors[n].nbytes)
        for n in names
    ]
    if found.replace is None:
        owner = adapter if found.base_in_adapter else model
        parts.append(((owner.source.label, found.base.file, found.base.name), found.base.nbytes))
    return parts


def load_model_info(source: ModelSource) -> ModelInfo:
    """Read config.json and the weight index/headers of `source` (no tensor data)."""
    files = set(source.files())
    gguf = sorted(f for f in files if f.endswith(".gguf") and "/" not in f)
    if len(gguf) == 1 and "config.json" not in files:
        from mergecli.io.gguf_input import load_gguf_info

        return load_gguf_info(source, gguf[0])
    safetensors = any(f.endswith(".safetensors") for f in files)
    if "config.json" not in files and not safetensors:
        raise NotFoundError(
            f"{source.label}: no config.json and no .safetensors file",
            hint="point at a folder or repo of a transformers model, or at .safetensors files",
        )
    # without a config (a bare .safetensors file or folder of them) tensors are merged name
    # for name; the output's config.json is then empty
    config = (
        read_json_object(source.local("config.json"), source.label)
        if "config.json" in files
        else {}
    )
    if SAFE_INDEX in files:
        tensors = _from_safetensors_index(source)
        fmt: Literal["safetensors", "bin"] = "safetensors"
    elif SAFE_SINGLE in files:
        tensors = safetensors_tensors(source, [SAFE_SINGLE])
        fmt = "safetensors"
    elif any(f.endswith(".safetensors") and "/" not in f for f in files):
        names = sorted(f for f in files if f.endswith(".safetensors") and "/" not in f)
        tensors = safetensors_tensors(source, names)
        fmt = "safetensors"
    elif BIN_INDEX in files or BIN_SINGLE in files:
        tensors = _from_bin(source, files)
        fmt = "bin"
    else:
        raise NotFoundError(
            f"{source.label}: no weights found (model.safetensors, shards with "
            f"{SAFE_INDEX}, or pytorch_model.bin)",
            hint="is this the model's root folder?",
        )
    return ModelInfo(source.label, source, config, tensors, fmt)


def safetensors_tensors(source: ModelSource, names: list[str]) -> dict[str, TensorInfo]:
    """Every tensor in the headers of the safetensors files `names` (in file order); a
    name found in two files is a damaged checkpoint."""
    tensors: dict[str, TensorInfo] = {}
    for filename in names:
        header = source.header(filename)
        for name, entry in sorted(header.entries.items(), key=lambda kv: kv[1].begin):
            if name in tensors:
                raise CorruptFileError(
                    f"{source.label}: tensor `{name}` is in both {tensors[name].file} and {filename}"
                )
            tensors[name] = TensorInfo(name, filename, entry.dtype, entry.shape)
    return tensors


def weight_map_of(source: ModelSource, index_file: str) -> dict[str, str]:
    """The index's `weight_map`, checked: tensor names to shard file names, all strings,
    each shard a plain relative name inside the model (no absolute path, no `..`)."""
    index = read_json_object(source.local(index_file), source.label)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CorruptFileError(f"{source.label}: {index_file} has no weight_map")
    for name, filename in weight_map.items():
        if not isinstance(filename, str) or not isinstance(name, str):
            raise CorruptFileError(
                f"{source.label}: {index_file} maps {name!r} to {filename!r}; "
                "tensor names and shard files must be strings"
            )
        check_relative(source.label, index_file, filename)
    return weight_map


def check_relative(label: str, where: str, filename: str) -> None:
    """Refuse a file name read from an input that could point outside its model."""
    parts = PurePosixPath(filename.replace("\\", "/")).parts
    if not parts or filename.startswith(("/", "\\")) or ".." in parts or ":" in parts[0]:
        raise CorruptFileError(
            f"{label}: {where} names the file {filename!r}, which is not inside the model",
            hint="file names in an index must be relative names inside the model folder",
        )


def _from_safetensors_index(source: ModelSource) -> dict[str, TensorInfo]:
    weight_map = weight_map_of(source, SAFE_INDEX)
    shards = sorted(set(weight_map.values()))
    found = safetensors_tensors(source, shards)
    for name, filename in weight_map.items():
        info = found.get(name)
        if info is None or info.file != filename:
            raise CorruptFileError(
                f"{source.label}: {SAFE_INDEX} maps `{name}` to {filename}, "
                "but that file's header does not hold it"
            )
    return {name: found[name] for name in found if name in weight_map}


def load_bin(path: Path, label: str) -> dict[str, torch.Tensor]:
    """Load a pickled checkpoint safely: tensors only (`weights_only=True`), memory-mapped."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # any failure to parse hostile bytes is the file's problem
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CorruptFileError(
            f"{label}: refused to load {path.name}: it is not a plain tensor checkpoint ({first})",
            hint="mergecli never runs code from pickles; convert the model to safetensors "
            "with a tool you trust",
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CorruptFileError(f"{label}: {path.name} is not a state dict of tensors")
    return state


def _from_bin(source: ModelSource, files: set[str]) -> dict[str, TensorInfo]:
    if BIN_INDEX in files:
        shards = sorted(set(weight_map_of(source, BIN_INDEX).values()))
    else:
        shards = [BIN_SINGLE]
    tensors: dict[str, TensorInfo] = {}
    for filename in shards:
        for name, tensor in load_bin(source.local(filename), source.label).items():
            code = TORCH_TO_CODE.get(tensor.dtype)
            if code is None:
                raise CorruptFileError(
                    f"{source.label}: `{name}` has unsupported dtype {tensor.dtype}"
                )
            tensors[name] = TensorInfo(name, filename, code, tuple(tensor.shape))
    return tensors
