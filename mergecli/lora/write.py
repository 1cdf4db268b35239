"""The adapter folder `extract-lora` writes: a safetensors file appended to tensor by tensor
(ranks are known only once each delta is factored), PEFT's `adapter_config.json`, a card."""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mergecli.io.adapter import ADAPTER_CONFIG
from mergecli.io.checkpoint import ModelInfo
from mergecli.io.dtypes import TORCH_TO_CODE


class AppendingSafetensors:
    """A safetensors file written without knowing its tensors ahead: data goes to a body
    file as it comes, the header is written in front at `close`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.body = path.with_name(path.name + ".body")
        self._handle = self.body.open("wb")
        self._entries: dict[str, dict[str, Any]] = {}
        self._offset = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Append `tensor` under `name`."""
        data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
        size = data.nbytes
        self._handle.write(data.tobytes())
        code = TORCH_TO_CODE[tensor.dtype]
        self._entries[name] = {
            "dtype": code,
            "shape": list(tensor.shape),
            "data_offsets": [self._offset, self._offset + size],
        }
        self._offset += size

    def close(self) -> int:
        """Write the file (header, then the body); return its size in bytes."""
        self._handle.close()
        header = json.dumps(
            {"__metadata__": {"format": "pt"}, **dict(sorted(self._entries.items()))},
            separators=(",", ":"),
        ).encode()
        header += b" " * (-len(header) % 8)
        with self.path.open("wb") as out, self.body.open("rb") as body:
            out.write(len(header).to_bytes(8, "little") + header)
            shutil.copyfileobj(body, out, 1 << 22)
        self.body.unlink()
        return self.path.stat().st_size


def write_config(folder: Path, config: dict[str, Any]) -> None:
    """PEFT's `adapter_config.json`."""
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def merged_config(
    models: Sequence[ModelInfo],
    rank: int,
    targets: list[str],
    saved: list[str] = (),  # type: ignore[assignment]
) -> dict[str, Any]:
    """The config of an adapter merged from the adapters folded into `models`: the first
    adapter's, with the new rank, alpha = rank (scale 1: the update is exactly what was
    merged), the modules written targeted and `saved` in modules_to_save, no rsLoRA, DoRA
    or per-module patterns."""
    fold = next(t.fold for m in models for t in m.tensors.values() if t.fold is not None)
    config = json.loads(fold.adapter.source.local(ADAPTER_CONFIG).read_text(encoding="utf-8"))
    return {
        **config,
        "r": rank,
        "lora_alpha": rank,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_rslora": False,
        "use_dora": False,
        "target_modules": sorted(targets),
        "modules_to_save": sorted(set(saved)) or None,
    }
