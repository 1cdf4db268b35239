"""Read tensors one at a time with positioned reads (safetensors) or safely loaded `.bin`.

safetensors files are read with positioned reads at the offsets of their header rather than
memory-mapped: pages of a mapped file stay resident in the process after use, so a merge
that maps its inputs ends with their whole size in RSS. Reading into a fresh buffer keeps
resident memory to the tensors in flight.
"""

from __future__ import annotations

import io
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from mergecli.errors import CorruptFileError
from mergecli.io.checkpoint import ModelInfo, TensorInfo, load_bin
from mergecli.io.dequant import dequantize
from mergecli.io.dtypes import CODE_TO_TORCH
from mergecli.io.fold import fold
from mergecli.io.header import Header, read_header

Rows = tuple[int, int] | None
PART_CACHE_BYTES = 64 << 20
FOLDED_CACHE_BYTES = 96 << 20


class _SafetensorsFile:
    """An open safetensors file and its parsed header."""

    def __init__(self, path: Path) -> None:
        self.header: Header = read_header(path)
        self.handle: io.BufferedReader = path.open("rb")
        self.lock = threading.Lock()

    def read(self, name: str, rows: Rows = None) -> torch.Tensor:
        entry = self.header.entries[name]
        shape, begin, end = entry.shape, entry.begin, entry.end
        if rows is not None:
            row_bytes = (end - begin) // shape[0]
            begin, end = begin + rows[0] * row_bytes, begin + rows[1] * row_bytes
            shape = (rows[1] - rows[0], *shape[1:])
        out = torch.empty(end - begin, dtype=torch.uint8)
        got = self._read_at(out.numpy().data, self.header.data_start + begin)
        if got != end - begin:
            raise OSError(f"short read of `{name}` ({got} of {end - begin} bytes)")
        return out.view(CODE_TO_TORCH[entry.dtype]).reshape(shape)

    def advise(self, name: str, rows: Rows = None) -> None:
        """Tell the kernel the bytes of `name` (or its `rows`) will be read soon."""
        entry = self.header.entries[name]
        begin, end = entry.begin, entry.end
        if rows is not None and entry.shape:
            row_bytes = (end - begin) // entry.shape[0]
            begin, end = begin + rows[0] * row_bytes, begin + rows[1] * row_bytes
        if end > begin and hasattr(os, "posix_fadvise"):
            start = self.header.data_start + begin
            os.posix_fadvise(self.handle.fileno(), start, end - begin, os.POSIX_FADV_WILLNEED)

    def _read_at(self, buffer: memoryview, offset: int) -> int:
        """Fill `buffer` from `offset`; positioned reads need no lock between threads."""
        if not hasattr(os, "preadv"):
            with self.lock:
                self.handle.seek(offset)
                return self.handle.readinto(buffer)
        view, got = memoryview(buffer).cast("B"), 0
        while got < len(view):
            count = os.preadv(self.handle.fileno(), [view[got:]], offset + got)
            if count == 0:
                break
            got += count
        return got


class _ByteCache:
    """Tensors by key, the oldest dropped once they hold more than `limit` bytes (callers
    hold the reader's lock)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._items: OrderedDict[Any, torch.Tensor] = OrderedDict()
        self._bytes = 0

    def get(self, key: Any) -> torch.Tensor | None:
        found = self._items.get(key)
        if found is not None:
            self._items.move_to_end(key)
        return found

    def pop(self, key: Any) -> torch.Tensor | None:
        found = self._items.pop(key, None)
        if found is not None:
            self._bytes -= found.numel() * found.element_size()
        return found

    def put(self, key: Any, tensor: torch.Tensor) -> None:
        if key in self._items:
            return
        self._items[key] = tensor
        self._bytes += tensor.numel() * tensor.element_size()
        while self._bytes > self.limit:
            _, dropped = self._items.popitem(last=False)
            self._bytes -= dropped.numel() * dropped.element_size()


class TensorReader:
    """Opens each input file once and hands out tensors by (model, name)."""

    def __init__(self, models: Sequence[ModelInfo] = ()) -> None:
        self._files: dict[tuple[str, str], Any] = {}
        self._lock = threading.Lock()
        self._shared = threading.local()
        self._bases = {
            m.source.label for m in models if any(t.fold for t in m.tensors.values())
        }  # sources that adapters fold into: their reads are shared within `sharing`
        self._parts = _ByteCache(PART_CACHE_BYTES)
        # folded blocks, for the next passes over the same tensor (returned as copies)
        self._folded = _ByteCache(FOLDED_CACHE_BYTES)
        self._keeping: set[str] = set()

    @contextmanager
    def sharing(self) -> Iterator[None]:
        """Within the block, reading one stored tensor again (a base that several adapters
        fold into, and the base itself) returns the tensor read first: the base is read
        once per job. A shared tensor may be handed out twice: callers must not change
        the tensors they read in place unless they know it was read once."""
        if getattr(self._shared, "found", None) is not None:
            yield
            return
        self._shared.found = {}
        try:
            yield
        finally:
            self._shared.found = None

    def _open(self, model: ModelInfo, filename: str) -> Any:
        key = (model.source.label, filename)
        with self._lock:
            if key not in self._files:
                path = model.source.local(filename)
                if model.weight_format == "bin":
                    self._files[key] = load_bin(path, model.label)
                elif model.weight_format == "gguf":
                    from mergecli.io.gguf_input import open_gguf

                    self._files[key] = open_gguf(path, model.label)
                else:
                    self._files[key] = _SafetensorsFile(path)
            return self._files[key]

    def read(self, model: ModelInfo, name: str, rows: Rows = None) -> torch.Tensor:
        """The tensor `name` of `model` (only rows [start, stop) when `rows` is given), as
        stored (no dtype conversion), or dequantized to float32 when stored packed."""
        info = model.tensors[name]
        if info.fold is None:
            return self._plain(model, info, rows)
        if not info.fold.base_in_adapter:
            self._bases.add(model.source.label)
        key = (model.label, name, rows)
        with self._lock:
            keeping = name in self._keeping
            kept = self._folded.get(key) if keeping else self._folded.pop(key)
        if kept is not None:
            return kept.clone() if keeping else kept
        folded = fold(
            info.fold,
            rows,
            lambda part, found, at: self._plain(part or model, found, at),
            self._factor,
        )
        size = folded.numel() * folded.element_size()
        if keeping and info.fold.replace is None and size <= FOLDED_CACHE_BYTES // 8:
            with self._lock:
                self._folded.put(key, folded)
            return folded.clone()
        return folded

    @contextmanager
    def keeping_folds(self, name: str) -> Iterator[None]:
        """While the statistics passes over tensor `name` run, its folded blocks are kept
        (copies handed out), so later passes do not fold again; the merge pass then takes
        each block (FOLDED_CACHE_BYTES in all; the oldest are dropped)."""
        with self._lock:
            self._keeping.add(name)
        try:
            yield
        finally:
            with self._lock:
                self._keeping.discard(name)

    def _factor(self, model: ModelInfo, info: TensorInfo) -> torch.Tensor:
        """An adapter tensor a fold reads (LoRA factors, magnitudes, biases) in float32; the
        small ones are kept for the next blocks and passes (PART_CACHE_BYTES in all), so
        callers must not change them."""
        if info.nbytes > PART_CACHE_BYTES // 8:
            return self._plain(model, info, None).to(torch.float32)
        key = (model.source.label, info.name)
        with self._lock:
            found = self._parts.get(key)
        if found is not None:
            return found
        found = self._plain(model, info, None).to(torch.float32)
        with self._lock:
            self._parts.put(key, found)
        return found

    def _plain(self, model: ModelInfo, info: TensorInfo, rows: Rows) -> torch.Tensor:
        if info.packed is not None:
            return dequantize(
                info, lambda part, part_rows: self._stored(model, part, part_rows), rows
            )
        return self._stored(model, info, rows)

    def _stored(self, model: ModelInfo, info: TensorInfo, rows: Rows) -> torch.Tensor:
        found: dict[tuple[str, str, str, Rows], torch.Tensor] | None = getattr(
            self._shared, "found", None
        )
        if found is None or model.source.label not in self._bases:
            return self._read_stored(model, info, rows)
        key = (model.source.label, info.file, info.name, rows)
        if key not in found:
            found[key] = self._read_stored(model, info, rows)
        return found[key]

    def _read_stored(self, model: ModelInfo, info: TensorInfo, rows: Rows) -> torch.Tensor:
        name = info.name
        if model.weight_format == "memory":
            tensor = model.source.tensors[name]  # type: ignore[attr-defined]
            return tensor if rows is None else tensor[rows[0] : rows[1]]  # type: ignore[no-any-return]
        opened = self._open(model, info.file)
        if model.weight_format == "bin":
            tensor = opened[name]
            return tensor if rows is None else tensor[rows[0] : rows[1]]  # type: ignore[no-any-return]
        if model.weight_format == "gguf":
            tensor = opened.read(name)
            return tensor if rows is None else tensor[rows[0] : rows[1]]  # type: ignore[no-any-return]
        try:
            return opened.read(name, rows)  # type: ignore[no-any-return]
        except (OSError, KeyError, RuntimeError) as exc:
            raise CorruptFileError(
                f"{model.label}: cannot read `{name}` from {info.file}: {exc}"
            ) from None

    def prefetch(self, model: ModelInfo, name: str, rows: Rows = None) -> None:
        """Advise the kernel to read tensor `name` of `model` (or its `rows`) ahead, for a
        safetensors file; best effort (a failure here is the read's to report)."""
        info = model.tensors.get(name)
        if info is not None and info.fold is not None and not info.fold.base_in_adapter:
            info = None if info.fold.replace else info.fold.base
        if info is None or info.packed is not None or model.weight_format != "safetensors":
            return
        try:
            opened = self._open(model, info.file)
            opened.advise(name, rows)
        except (OSError, KeyError, ValueError):
            return

    def close(self) -> None:
        """Close every open file."""
        with self._lock:
            for opened in self._files.values():
                if isinstance(opened, _SafetensorsFile):
                    opened.handle.close()
            self._files.clear()
