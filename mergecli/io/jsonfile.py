"""The one JSON reader for input files (configs, indexes, tokenizers, trainer states)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mergecli.errors import CorruptFileError

MAX_JSON_BYTES = 1 << 30  # a tokenizer.json of a large vocabulary is tens of MB


def read_json(path: Path, label: str) -> Any:
    """The JSON document in `path`; a file that cannot be read or parsed, is larger than
    MAX_JSON_BYTES or nested too deeply is a CorruptFileError naming `label` (which model
    and file)."""
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise CorruptFileError(
                f"{label}: {path.name} is {size} bytes; JSON inputs are limited to "
                f"{MAX_JSON_BYTES} bytes",
                hint="is this the right file?",
            )
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CorruptFileError(
            f"{label}: cannot read {path.name}: {exc}",
            hint="the file is truncated or not JSON; re-download or re-save the model",
        ) from None


def read_json_object(path: Path, label: str) -> dict[str, Any]:
    """`read_json`, and the document must be an object."""
    data = read_json(path, label)
    if not isinstance(data, dict):
        raise CorruptFileError(f"{label}: {path.name} is not a JSON object")
    return data
