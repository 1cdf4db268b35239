"""GGUF files as input models, read with the `gguf` package and dequantized to float32.

A GGUF file holds a config (its metadata), tensors under llama.cpp's names in ggml order,
and quantized blocks. transformers knows how llama.cpp converted each architecture: its
GGUF config mapping, tensor-name map and per-architecture value fix-ups (Llama's Q/K
permutation, Gemma's norm offset, ...). The index is built from the metadata and a
meta-device model (no weights read); each tensor is dequantized with `gguf`'s own
dequantizers when it is read, fixed up, and checked against the shape the model expects.
"""

from __future__ import annotations

import atexit
import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import import_module
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mergecli.errors import CorruptFileError, IncompatibleModelError, NotFoundError
from mergecli.io.checkpoint import ModelInfo, TensorInfo
from mergecli.io.header import Header
from mergecli.io.source import ModelSource, inside

# architectures whose transformers processor maps one GGUF tensor to one HF tensor;
# the MoE processors (qwen2moe, qwen3moe, gpt-oss, minimax-m2) fuse experts across tensors
_ONE_TO_ONE = {"TensorProcessor", "LlamaTensorProcessor", "BloomTensorProcessor",
               "T5TensorProcessor", "MambaTensorProcessor", "NemotronTensorProcessor",
               "Gemma2TensorProcessor", "Lfm2TensorProcessor", "GPT2TensorProcessor"}  # fmt: skip
_CONVERT_HINT = (
    "convert it to safetensors with transformers (`AutoModelForCausalLM.from_pretrained("
    "folder, gguf_file=...)`, then `save_pretrained`) and merge that folder"
)


def _gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise IncompatibleModelError(
            "reading GGUF files needs the `gguf` package, which is not installed",
            hint="pip install 'mergecli[gguf]'",
        ) from None
    return gguf


@dataclass
class GgufSource:
    """A local GGUF file as a model: the file itself, plus the tokenizer files transformers
    builds from its metadata (written once to a private temporary folder)."""

    path: Path
    label: str
    commit: str | None = None
    _tokenizer: dict[str, Path] | None = field(default=None, repr=False)

    def files(self) -> list[str]:
        """The GGUF file's name and the tokenizer files made from it."""
        return [self.path.name, *sorted(self._tokenizer_files())]

    def local(self, filename: str) -> Path:
        """The GGUF file, or a tokenizer file made from its metadata."""
        if filename == self.path.name:
            inside(self.label, self.path.parent, self.path, filename)
            return self.path
        made = self._tokenizer_files()
        if filename not in made:
            raise NotFoundError(f"{self.label}: file {filename} not found in {self.path.name}")
        return made[filename]

    def header(self, filename: str) -> Header:
        """GGUF files have no safetensors header."""
        raise NotFoundError(f"{self.label}: {filename} is not a safetensors file")

    def _tokenizer_files(self) -> dict[str, Path]:
        if self._tokenizer is None:
            self._tokenizer = _tokenizer_from_gguf(self.path)
        return self._tokenizer


def _tokenizer_from_gguf(path: Path) -> dict[str, Path]:
    """tokenizer.json and tokenizer_config.json as transformers converts the GGUF's
    `tokenizer.ggml.*` metadata; none when the file has no tokenizer it can convert."""
    from transformers import AutoTokenizer

    folder = Path(tempfile.mkdtemp(prefix="mergecli-gguf-tokenizer-"))
    atexit.register(shutil.rmtree, folder, True)
    quiet = logging.getLogger("transformers")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name).save_pretrained(folder)
    except Exception:  # no tokenizer metadata, or a kind transformers does not convert
        return {}
    finally:
        quiet.setLevel(level)
    return {
        p.name: p for p in folder.iterdir() if p.name in ("tokenizer.json", "tokenizer_config.json")
    }


class GgufFile:
    """An open GGUF file: its HF config, the processor that undoes llama.cpp's conversion,
    and the map from HF tensor names to the file's tensors."""

    def __init__(self, path: Path, label: str) -> None:
        gguf = _gguf()
        self.label = label
        try:
            self.reader = gguf.GGUFReader(path)
        except Exception as exc:  # any failure to parse hostile bytes is the file's problem
            raise CorruptFileError(
                f"{label}: {path.name} is not a readable GGUF file ({exc})",
                hint="re-download or re-convert the file",
            ) from None
        self.config, meta_state, self.processor, mapping = _interpret(path, label, self.reader)
        by_name = {t.name: t for t in self.reader.tensors}
        self.tensors: dict[str, Any] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for gguf_name, hf_name in mapping.items():
            if gguf_name in by_name and hf_name in meta_state:
                self.tensors[hf_name] = by_name[gguf_name]
                self.shapes[hf_name] = tuple(meta_state[hf_name].shape)
        if not self.tensors:
            raise IncompatibleModelError(
                f"{label}: none of the GGUF file's tensors map to the model's parameters",
                hint=_CONVERT_HINT,
            )

    def dtype_of(self, name: str) -> str:
        """The dtype a tensor is handed out in: F16/BF16 as stored, float32 otherwise."""
        kind = self.tensors[name].tensor_type.name
        return kind if kind in ("F16", "BF16") else "F32"

    def read(self, name: str) -> torch.Tensor:
        """Dequantize `name`, undo the conversion's fix-ups, check its shape."""
        gguf = _gguf()
        entry = self.tensors[name]
        try:
            weights = gguf.dequantize(entry.data, entry.tensor_type)
            stash: dict[str, dict[str, torch.Tensor]] = {"tensors": {}}
            result = self.processor.process(
                weights=weights, name=entry.name, tensor_key_mapping={}, parsed_parameters=stash
            )
            # GPT-2's processor hands its output projection back through `parsed_parameters`
            weights = (
                result.weights
                if result.name is not None
                else next(iter(stash["tensors"].values())).numpy()
            )
        except (ValueError, NotImplementedError, IndexError) as exc:
            raise CorruptFileError(
                f"{self.label}: cannot dequantize `{entry.name}`: {exc}"
            ) from None
        tensor = torch.from_numpy(np.array(weights, dtype=np.float32, order="C"))
        if tuple(tensor.shape) != self.shapes[name]:
            raise CorruptFileError(
                f"{self.label}: GGUF tensor `{entry.name}` has shape {tuple(tensor.shape)}, "
                f"but the model's `{name}` is {self.shapes[name]}"
            )
        target = {"F16": torch.float16, "BF16": torch.bfloat16}.get(self.dtype_of(name))
        return tensor if target is None else tensor.to(target)


def open_gguf(path: Path, label: str) -> GgufFile:
    """The GGUF file at `path`, parsed once for planning and reading alike (its metadata,
    the meta-device model and the name map are not rebuilt when the run opens it); a file
    changed since is parsed again."""
    stat = path.stat()
    return _open_cached(path, label, stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=8)
def _open_cached(path: Path, label: str, mtime_ns: int, size: int) -> GgufFile:
    return GgufFile(path, label)


def _interpret(
    path: Path, label: str, reader: Any
) -> tuple[dict[str, Any], dict[str, torch.Tensor], Any, dict[str, str]]:
    """The HF config, meta state dict, processor and GGUF-to-HF name map of a GGUF file."""
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_gguf: Any = import_module("transformers.modeling_gguf_pytorch_utils")
    auto_model: Any = AutoModelForCausalLM

    try:
        parsed = hf_gguf.load_gguf_checkpoint(str(path), return_tensors=False)
    except (ValueError, KeyError, NotImplementedError) as exc:
        raise IncompatibleModelError(
            f"{label}: transformers cannot read this GGUF file's architecture ({exc})",
            hint="only architectures transformers loads from GGUF can be merged; " + _CONVERT_HINT,
        ) from None
    fields = dict(parsed["config"])
    architecture = str(hf_gguf.read_field(reader, "general.architecture")[0])
    processor_class = hf_gguf.TENSOR_PROCESSORS.get(architecture, hf_gguf.TensorProcessor)
    if processor_class.__name__ not in _ONE_TO_ONE:
        raise IncompatibleModelError(
            f"{label}: GGUF architecture `{architecture}` stores tensors that transformers "
            "fuses on load (experts), which mergecli does not read from GGUF",
            hint=_CONVERT_HINT,
        )
    model_type = fields.pop("model_type")
    try:
        config = AutoConfig.for_model(model_type, **fields)
        with torch.device("meta"):
            model = auto_model.from_config(config)
    except (ValueError, KeyError, TypeError) as exc:
        raise IncompatibleModelError(
            f"{label}: the GGUF metadata does not make a valid `{model_type}` config ({exc})",
            hint=_CONVERT_HINT,
        ) from None
    processor = processor_class(config=parsed["config"])
    mapping = hf_gguf.get_gguf_hf_weights_map(model, processor)
    config_dict = config.to_dict()
    config_dict["architectures"] = [type(model).__name__]
    return config_dict, model.state_dict(), processor, mapping


def load_gguf_info(source: ModelSource, filename: str) -> ModelInfo:
    """The ModelInfo of a GGUF file (config from its metadata, tensors under HF names)."""
    opened = open_gguf(source.local(filename), source.label)
    supported = _supported_types(_gguf())
    tensors: dict[str, TensorInfo] = {}
    for name, entry in opened.tensors.items():
        if entry.tensor_type not in supported:
            raise IncompatibleModelError(
                f"{source.label}: `{entry.name}` is stored as {entry.tensor_type.name}, which "
                "the gguf package cannot dequantize",
                hint="use a file quantized with a supported type (F32, F16, BF16, Q4_0..Q8_0, "
                "K-quants, IQ-quants) or " + _CONVERT_HINT,
            )
        tensors[name] = TensorInfo(name, filename, opened.dtype_of(name), opened.shapes[name])
    return ModelInfo(source.label, source, opened.config, tensors, "gguf")


def _supported_types(gguf: Any) -> set[Any]:
    kinds = gguf.GGMLQuantizationType
    return {kinds.F32, kinds.F16, *gguf.quants._type_traits}
