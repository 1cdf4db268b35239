"""Read and check safetensors headers without reading tensor data.

Format: 8 bytes little-endian header length N, N bytes of JSON
`{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}`, then the data.
Every way a header can lie (sizes, offsets past the end, duplicate names) is a
`CorruptFileError` that names the file and the tensor.
"""

from __future__ import annotations

import itertools
import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergecli.errors import CorruptFileError
from mergecli.io.dtypes import ITEMSIZE

MAX_HEADER_BYTES = 100_000_000


@dataclass(frozen=True)
class HeaderEntry:
    """One tensor as the header describes it; offsets are relative to the data section."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class Header:
    """A parsed safetensors header."""

    entries: dict[str, HeaderEntry]
    metadata: dict[str, str]
    data_start: int


def read_header(path: Path) -> Header:
    """Parse and check the header of the safetensors file at `path`."""
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise _corrupt(path, f"file is {size} bytes, too short for a safetensors header")
            (length,) = struct.unpack("<Q", prefix)
            if length > min(MAX_HEADER_BYTES, size - 8):
                raise _corrupt(path, f"header claims {length} bytes but the file has {size}")
            raw = handle.read(length)
    except OSError as exc:
        raise CorruptFileError(f"cannot read {path}: {exc.strerror}") from None
    return parse_header(raw, size - 8 - len(raw), str(path))


def parse_header(raw: bytes, data_size: int, where: str) -> Header:
    """Parse header JSON bytes for a data section of `data_size` bytes."""
    try:
        doc = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates(where))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise _corrupt(where, f"header is not valid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise _corrupt(where, "header is not a JSON object")
    metadata = doc.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise _corrupt(where, "`__metadata__` is not an object")
    entries = {name: _entry(where, name, spec, data_size) for name, spec in doc.items()}
    _no_overlaps(where, entries)
    return Header(entries, {str(k): str(v) for k, v in metadata.items()}, 8 + len(raw))


def _no_overlaps(where: str, entries: dict[str, HeaderEntry]) -> None:
    """Tensors' byte ranges must not overlap (safetensors refuses such files too)."""
    spans = sorted((e.begin, e.end, name) for name, e in entries.items() if e.end > e.begin)
    for (_, end, first), (begin, _, second) in itertools.pairwise(spans):
        if begin < end:
            raise _corrupt(where, f"tensors `{first}` and `{second}` overlap in the data")


def _no_duplicates(where: str) -> Any:
    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise _corrupt(where, f"tensor `{key}` appears twice in the header")
            out[key] = value
        return out

    return hook


def _entry(where: str, name: str, spec: Any, data_size: int) -> HeaderEntry:
    if not isinstance(spec, dict):
        raise _corrupt(where, f"entry for `{name}` is not an object")
    dtype, shape, offsets = spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")
    if dtype not in ITEMSIZE:
        raise _corrupt(where, f"tensor `{name}` has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise _corrupt(where, f"tensor `{name}` has a malformed shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
    ):
        raise _corrupt(where, f"tensor `{name}` has malformed data_offsets {offsets!r}")
    begin, end = offsets
    expected = math.prod(shape) * ITEMSIZE[dtype]
    if not 0 <= begin <= end or end - begin != expected:
        raise _corrupt(
            where,
            f"tensor `{name}` has {end - begin} bytes at [{begin}, {end}) but shape "
            f"{shape} of {dtype} needs {expected}",
        )
    if end > data_size:
        raise _corrupt(
            where,
            f"tensor `{name}` ends at byte {end} of the data but the file holds only "
            f"{data_size} (truncated download?)",
        )
    return HeaderEntry(dtype, tuple(shape), begin, end)


def _corrupt(where: object, message: str) -> CorruptFileError:
    return CorruptFileError(
        f"{where}: {message}",
        hint="re-download the file (delete it from the cache) or re-save the model",
    )
