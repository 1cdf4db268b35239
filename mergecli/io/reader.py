"""Read tensors lazily: memory-mapped safetensors (`safe_open`) or safely loaded `.bin`."""

from __future__ import annotations

import threading
from typing import Any

import torch
from safetensors import safe_open

from mergecli.errors import CorruptFileError
from mergecli.io.checkpoint import ModelInfo, load_bin


class TensorReader:
    """Opens each input file once and hands out tensors by (model, name)."""

    def __init__(self) -> None:
        self._handles: dict[tuple[str, str], Any] = {}
        self._lock = threading.Lock()

    def _handle(self, model: ModelInfo, filename: str) -> Any:
        key = (model.label, filename)
        with self._lock:
            if key not in self._handles:
                path = model.source.local(filename)
                if model.weight_format == "bin":
                    self._handles[key] = load_bin(path, model.label)
                else:
                    try:
                        self._handles[key] = safe_open(str(path), framework="pt")
                    except Exception as exc:
                        raise CorruptFileError(
                            f"{model.label}: cannot open {filename}: {exc}"
                        ) from None
            return self._handles[key]

    def read(self, model: ModelInfo, name: str) -> torch.Tensor:
        """The tensor `name` of `model`, as stored (no dtype conversion)."""
        info = model.tensors[name]
        handle = self._handle(model, info.file)
        if model.weight_format == "bin":
            return handle[name]  # type: ignore[no-any-return]
        try:
            return handle.get_tensor(name)  # type: ignore[no-any-return]
        except Exception as exc:
            raise CorruptFileError(
                f"{model.label}: cannot read `{name}` from {info.file}: {exc}"
            ) from None

    def close(self) -> None:
        """Drop every open handle."""
        with self._lock:
            self._handles.clear()
