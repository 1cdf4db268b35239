"""safetensors headers (corruption is caught) and the streaming shard writer."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mergecli.errors import CorruptFileError
from mergecli.io.dtypes import TORCH_TO_CODE
from mergecli.io.header import read_header
from mergecli.io.writer import ShardWriter
from mergecli.plan.shards import assign_shards, shard_name
from mergecli.plan.types import TensorPlan


def raw_file(path: Path, header: object, data: bytes = b"") -> Path:
    body = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)
    return path


def test_header_matches_safetensors(tmp_path: Path) -> None:
    tensors = {"a": torch.ones(2, 3), "b": torch.arange(5, dtype=torch.int64)}
    save_file(tensors, str(tmp_path / "x.safetensors"), metadata={"format": "pt"})
    header = read_header(tmp_path / "x.safetensors")
    assert header.metadata == {"format": "pt"}
    assert {n: (e.dtype, e.shape, e.end - e.begin) for n, e in header.entries.items()} == {
        "a": ("F32", (2, 3), 24),
        "b": ("I64", (5,), 40),
    }


@pytest.mark.parametrize(
    ("header", "data", "message"),
    [
        (
            {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}},
            b"\0" * 4,
            "ends at byte 8 of the data but the file holds only 4 (truncated download?)",
        ),
        (
            {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}},
            b"\0" * 8,
            "has 8 bytes at [0, 8) but shape [3] of F32 needs 12",
        ),
        (
            {"a": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}},
            b"\0" * 8,
            "unknown dtype 'Q4'",
        ),
        (
            {"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}},
            b"\0" * 8,
            "malformed shape [-2]",
        ),
        (
            {"a": {"dtype": "F32", "shape": [2], "data_offsets": [8]}},
            b"\0" * 8,
            "malformed data_offsets [8]",
        ),
        ([1, 2], b"", "header is not a JSON object"),
    ],
)
def test_lying_headers_are_caught(
    tmp_path: Path, header: object, data: bytes, message: str
) -> None:
    path = raw_file(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(CorruptFileError) as info:
        read_header(path)
    assert message in info.value.message
    assert str(path) in info.value.message


def test_duplicate_names_and_short_files(tmp_path: Path) -> None:
    body = b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    path = tmp_path / "dup.safetensors"
    path.write_bytes(struct.pack("<Q", len(body)) + body + b"\0" * 4)
    with pytest.raises(CorruptFileError, match="tensor `a` appears twice in the header"):
        read_header(path)
    short = tmp_path / "short.safetensors"
    short.write_bytes(b"\x01\x02")
    with pytest.raises(CorruptFileError, match="too short for a safetensors header"):
        read_header(short)
    huge = tmp_path / "huge.safetensors"
    huge.write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(
        CorruptFileError, match="header claims 1000000000000 bytes but the file has 10"
    ):
        read_header(huge)


def plan_of(tensors: dict[str, torch.Tensor]) -> list[TensorPlan]:
    return [
        TensorPlan(
            name, tuple(t.shape), TORCH_TO_CODE[t.dtype], "layer", None, 0.0, (), None, {}, (), True
        )
        for name, t in tensors.items()
    ]


def test_shards_fill_in_order_and_never_exceed_the_size() -> None:
    tensors = plan_of({f"t{i}": torch.zeros(25) for i in range(7)})  # 100 bytes each
    placed, names = assign_shards(tensors, 250)
    assert [t.shard for t in placed] == [0, 0, 1, 1, 2, 2, 3]
    assert names == tuple(f"model-0000{i}-of-00004.safetensors" for i in range(1, 5))
    one, single = assign_shards(tensors, 10**6)
    assert single == ("model.safetensors",) and {t.shard for t in one} == {0}
    big, _ = assign_shards(plan_of({"big": torch.zeros(1000), "x": torch.zeros(1)}), 100)
    assert [t.shard for t in big] == [0, 1]  # an oversized tensor gets a shard of its own
    assert shard_name(2, 12) == "model-00003-of-00012.safetensors"


def test_streamed_shards_read_back_exactly(tmp_path: Path) -> None:
    torch.manual_seed(0)
    tensors = {
        "w": torch.randn(7, 5),
        "h": torch.randn(3).to(torch.bfloat16),
        "i": torch.arange(4, dtype=torch.int64),
        "s": torch.tensor(2.5),
        "e": torch.zeros(0, 3),
    }
    placed, names = assign_shards(plan_of(tensors), 150)
    writer = ShardWriter(tmp_path, names, placed)
    writer.open()
    for name in reversed(list(tensors)):  # out of order on purpose: offsets are fixed up front
        writer.write(name, tensors[name])
    writer.close()
    index = writer.index()
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in tensors.values()
    )
    assert set(index["weight_map"].values()) == set(names)
    for size, name in zip(writer.shard_sizes, names):
        assert (tmp_path / name).stat().st_size == size
        header = read_header(tmp_path / name)
        assert header.data_start % 8 == 0
        with safe_open(str(tmp_path / name), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open has no __iter__
                assert torch.equal(handle.get_tensor(key), tensors[key])
                assert index["weight_map"][key] == name


def test_writer_refuses_a_tensor_of_the_wrong_dtype(tmp_path: Path) -> None:
    placed, names = assign_shards(plan_of({"w": torch.zeros(2)}), 100)
    writer = ShardWriter(tmp_path, names, placed)
    writer.open()
    with pytest.raises(ValueError, match=r"got torch\.float16, planned F32"):
        writer.write("w", torch.zeros(2, dtype=torch.float16))
    writer.abort()


def test_finished_shards_are_hashed_as_written(tmp_path: Path) -> None:
    torch.manual_seed(1)
    tensors = {f"t{i}": torch.randn(10, 5) for i in range(4)}  # 200 bytes each
    placed, names = assign_shards(plan_of(tensors), 450)
    writer = ShardWriter(tmp_path, names, placed)
    writer.open()
    writer.write("t0", tensors["t0"][:4])  # in file order, in two row blocks
    writer.write("t0", tensors["t0"][4:], 4 * 5 * 4)
    writer.write("t1", tensors["t1"])
    in_order = writer.finish_shard(0)
    writer.write("t3", tensors["t3"])  # out of order: no digest, the caller reads the file
    writer.write("t2", tensors["t2"])
    out_of_order = writer.finish_shard(1)
    writer.close()
    assert in_order == hashlib.sha256((tmp_path / names[0]).read_bytes()).hexdigest()
    assert out_of_order is None
    with safe_open(str(tmp_path / names[1]), framework="pt") as handle:
        assert torch.equal(handle.get_tensor("t3"), tensors["t3"])


def test_written_bytes_are_flushed_every_flush_bytes_and_errors_reach_close(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mergecli.errors import OutputError
    from mergecli.io import writer as writer_module

    flushed: list[tuple[int, int]] = []  # (fd, file size when flushed)

    def record(fd: int) -> None:
        flushed.append((fd, os.fstat(fd).st_size))

    monkeypatch.setattr(writer_module, "FLUSH_BYTES", 400)
    monkeypatch.setattr(writer_module, "_datasync", record)
    tensors = {f"t{i}": torch.full((50,), float(i)) for i in range(5)}  # 200 bytes each
    placed, names = assign_shards(plan_of(tensors), 10**6)
    writer = ShardWriter(tmp_path, names, placed)
    writer.open()
    for name, tensor in tensors.items():
        writer.write(name, tensor)
        for future in list(writer._syncs):  # each flush done before the next write
            future.result()
    writer.close()
    # 1000 bytes in steps of 200: a flush after 400 and after 800, none for the tail
    assert len(flushed) == 2
    with safe_open(str(tmp_path / names[0]), framework="pt") as handle:
        assert all(torch.equal(handle.get_tensor(k), t) for k, t in tensors.items())

    def fail(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(writer_module, "_datasync", fail)
    failing = ShardWriter(tmp_path / "x", names, placed)
    (tmp_path / "x").mkdir()
    failing.open()
    for name, tensor in tensors.items():
        failing.write(name, tensor)
    with pytest.raises(OutputError, match="disk full"):
        failing.close()
