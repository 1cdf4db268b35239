"""Hostile model folders: an index pointing outside the model, links out of it, malformed
indexes and headers. Each is refused (exit 3) before any weight is read, naming the file."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import invoke, write

INDEX = "model.safetensors.index.json"


def sharded(family: dict[str, Path], dest: Path, weight_map: object) -> Path:
    """Model `a` with its weights listed by an index whose weight_map is `weight_map`."""
    shutil.copytree(family["a"], dest)
    (dest / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dest


def recipe_of(tmp_path: Path, folder: Path) -> Path:
    return write(
        tmp_path / "r.yaml",
        f"merge_method: linear\nmodels:\n  - model: {folder}\n    parameters: {{weight: 1}}\n",
    )


def names_of(folder: Path) -> list[str]:
    header = (folder / "model.safetensors").read_bytes()
    (length,) = struct.unpack("<Q", header[:8])
    return [k for k in json.loads(header[8 : 8 + length]) if k != "__metadata__"]


OUTSIDE = [
    ("../other/model.safetensors", "is not inside the model"),
    ("/etc/passwd", "is not inside the model"),
    ("sub/../../x.safetensors", "is not inside the model"),
    ("..\\x.safetensors", "is not inside the model"),
    ("C:\\x.safetensors", "is not inside the model"),
    ("\\\\server\\share\\x", "is not inside the model"),
]


@pytest.mark.parametrize(("shard", "message"), OUTSIDE, ids=[s for s, _ in OUTSIDE])
@pytest.mark.parametrize("command", ["validate", "plan", "run"])
def test_index_shards_outside_the_model_are_refused(
    family: dict[str, Path],
    tmp_path: Path,
    runner: CliRunner,
    shard: str,
    message: str,
    command: str,
) -> None:
    other = tmp_path / "other"
    shutil.copytree(family["b"], other)
    folder = sharded(family, tmp_path / "m", dict.fromkeys(names_of(family["a"]), shard))
    args = [command, str(recipe_of(tmp_path, folder))]
    code, _, err = invoke(
        runner, *args, *(["-o", str(tmp_path / "out")] if command == "run" else [])
    )
    assert code == 3, err
    assert f"{INDEX} names the file {shard!r}, which is not inside the model" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("weight_map", "message"),
    [
        ({"w": 3}, "tensor names and shard files must be strings"),
        ({"w": ["model.safetensors"]}, "tensor names and shard files must be strings"),
        ({"w": {"file": "model.safetensors"}}, "tensor names and shard files must be strings"),
        ({"w": None}, "tensor names and shard files must be strings"),
        ([], "has no weight_map"),
        ("model.safetensors", "has no weight_map"),
        ({}, "has no weight_map"),
    ],
    ids=["int", "list", "dict", "null", "list-map", "string-map", "empty"],
)
def test_malformed_weight_maps_are_refused(
    family: dict[str, Path], tmp_path: Path, runner: CliRunner, weight_map: object, message: str
) -> None:
    folder = sharded(family, tmp_path / "m", weight_map)
    code, _, err = invoke(runner, "validate", str(recipe_of(tmp_path, folder)))
    assert code == 3, err
    assert message in err


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[" * 100_000 + "]" * 100_000, "cannot read model.safetensors.index.json"),
        ('{"weight_map": {"w": "model.safetensors"', "cannot read model.safetensors.index.json"),
        ("\xff\xfe", "cannot read model.safetensors.index.json"),
        ("[1, 2]", "is not a JSON object"),
    ],
    ids=["deep", "truncated", "not-utf8", "not-object"],
)
def test_unreadable_indexes_are_refused(
    family: dict[str, Path], tmp_path: Path, runner: CliRunner, text: str, message: str
) -> None:
    folder = sharded(family, tmp_path / "m", {})
    (folder / INDEX).write_bytes(text.encode("latin-1"))
    code, _, err = invoke(runner, "validate", str(recipe_of(tmp_path, folder)))
    assert code == 3, err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("file", ["model.safetensors", "tokenizer.json", "config.json"])
def test_links_out_of_the_model_folder_are_refused(
    family: dict[str, Path], tmp_path: Path, runner: CliRunner, file: str
) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    folder = tmp_path / "m"
    shutil.copytree(family["a"], folder)
    shutil.move(folder / file, outside / file)
    os.symlink(outside / file, folder / file)
    code, _, err = invoke(runner, "validate", str(recipe_of(tmp_path, folder)))
    assert code == 3, err
    assert f"{file} leads outside the model folder (to {outside / file})" in err


def test_links_inside_the_model_folder_are_followed(
    family: dict[str, Path], tmp_path: Path, runner: CliRunner
) -> None:
    folder = tmp_path / "m"
    shutil.copytree(family["a"], folder)
    (folder / "blobs").mkdir()
    shutil.move(folder / "model.safetensors", folder / "blobs" / "weights")
    os.symlink("blobs/weights", folder / "model.safetensors")
    code, _, err = invoke(runner, "validate", str(recipe_of(tmp_path, folder)))
    assert code == 0, err


def _header_file(folder: Path, header: dict[str, object], data: bytes) -> None:
    raw = json.dumps(header).encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + data)


@pytest.mark.parametrize(
    ("header", "data", "message"),
    [
        (
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            b"\0" * 12,
            "tensors `a` and `b` overlap in the data",
        ),
        (
            {
                "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]},
            },
            b"\0" * 16,
            "tensors `a` and `b` overlap in the data",
        ),
        (
            {"a": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}},
            b"\0" * 4,
            "malformed shape",
        ),
        (
            {"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}},
            b"\0" * 4,
            "malformed shape",
        ),
        (
            {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0.0, 4]}},
            b"\0" * 4,
            "malformed data_offsets",
        ),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, b"\0" * 4, "needs 4"),
        ({"a": {"dtype": "X9", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, "unknown dtype"),
        ({"a": [1, 2]}, b"", "is not an object"),
        ({"__metadata__": [1]}, b"", "`__metadata__` is not an object"),
    ],
    ids=[
        "overlap",
        "inside",
        "bool-dim",
        "negative-dim",
        "float-offset",
        "reversed",
        "dtype",
        "entry",
        "metadata",
    ],
)
def test_lying_headers_are_refused(
    family: dict[str, Path],
    tmp_path: Path,
    runner: CliRunner,
    header: dict[str, object],
    data: bytes,
    message: str,
) -> None:
    folder = tmp_path / "m"
    shutil.copytree(family["a"], folder)
    _header_file(folder, header, data)
    code, _, err = invoke(runner, "validate", str(recipe_of(tmp_path, folder)))
    assert code == 3, err
    assert message in err


def test_a_deeply_nested_header_is_refused(
    family: dict[str, Path], tmp_path: Path, runner: CliRunner
) -> None:
    folder = tmp_path / "m"
    shutil.copytree(family["a"], folder)
    raw = b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw)
    code, _, err = invoke(runner, "validate", str(recipe_of(tmp_path, folder)))
    assert code == 3, err
    assert "header is not valid JSON" in err


def test_an_absurd_layer_index_is_refused_at_once(
    family: dict[str, Path], tmp_path: Path, runner: CliRunner
) -> None:
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "m"
    shutil.copytree(family["a"], folder)
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.100000000.extra.weight"] = tensors["model.norm.weight"].clone()
    save_file(tensors, str(folder / "model.safetensors"))
    code, _, err = invoke(runner, "validate", str(recipe_of(tmp_path, folder)))
    assert code == 3, err
    assert (
        "the layers of `model.layers` are numbered up to 100000000 but only 4 exist (no layer 3)"
        in err
    )


def _pickles() -> dict[str, bytes]:
    import io
    import pickle

    import torch

    buffers = {"nested": b"\x80\x02" + b"]" * 100_000 + b"."}  # 100000 lists on the unpickler stack
    for name, value in {"not-tensors": {"w": "text"}, "list": [1, 2]}.items():
        out = io.BytesIO()
        torch.save(value, out)
        buffers[name] = out.getvalue()
    buffers["pickle-of-a-dict"] = pickle.dumps({"w": 1}, protocol=2)
    good = io.BytesIO()
    torch.save({"w": torch.ones(3)}, good)
    buffers["truncated-zip"] = good.getvalue()[:200]
    buffers["random"] = bytes(range(256)) * 40
    buffers["empty"] = b""
    return buffers


@pytest.mark.parametrize("kind", sorted(_pickles()))
def test_hostile_bin_checkpoints_are_refused(
    family: dict[str, Path], tmp_path: Path, runner: CliRunner, kind: str
) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    shutil.copy(family["a"] / "config.json", folder / "config.json")
    (folder / "pytorch_model.bin").write_bytes(_pickles()[kind])
    code, _, err = invoke(runner, "validate", str(recipe_of(tmp_path, folder)))
    assert code == 3, err
    assert "pytorch_model.bin" in err and "Traceback" not in err
