"""Stream tensors into safetensors shards whose headers are fixed from the plan.

Each shard's header (names, dtypes, shapes, offsets) is known before any tensor is
computed, so a finished tensor is written straight to its offset and no shard is ever
held in memory whole. Bytes written in file order are hashed as they go, so a finished
shard's sha256 needs no re-read.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mergecli.errors import OutputError
from mergecli.io.dtypes import CODE_TO_TORCH

FLUSH_BYTES = 64 << 20
_datasync = getattr(os, "fdatasync", os.fsync)


@dataclass(frozen=True)
class TensorSlot:
    """A tensor's place in its shard."""

    shard: int
    offset: int
    nbytes: int
    dtype: str


class ShardWriter:
    """Writes the output shards of a plan into `folder` (hashing them unless `digest` is
    False)."""

    def __init__(
        self,
        folder: Path,
        shard_names: Sequence[str],
        tensors: Sequence[Any],
        digest: bool = True,
    ) -> None:
        self.folder = folder
        self.digest = digest
        self.shard_names = tuple(shard_names)
        self.slots: dict[str, TensorSlot] = {}
        self._headers: list[bytes] = []
        self._sizes: list[int] = []
        self._fds: dict[int, int] = {}
        self._open_lock = threading.Lock()
        self._syncer: ThreadPoolExecutor | None = None
        self._syncs: list[Future[None]] = []
        self._unflushed: dict[int, int] = {}
        self._flushing: dict[int, Future[None]] = {}
        self._digests: dict[int, Any] = {}
        self._hashed: dict[int, int] = {}  # bytes hashed from the start; -1 once out of order
        self._layout(tensors)

    def _layout(self, tensors: Sequence[Any]) -> None:
        per_shard: list[list[Any]] = [[] for _ in self.shard_names]
        for tensor in tensors:
            per_shard[tensor.shard].append(tensor)
        for shard, members in enumerate(per_shard):
            entries: dict[str, Any] = {"__metadata__": {"format": "pt"}}
            cursor = 0
            for tensor in members:
                entries[tensor.name] = {
                    "dtype": tensor.dtype,
                    "shape": list(tensor.shape),
                    "data_offsets": [cursor, cursor + tensor.nbytes],
                }
                cursor += tensor.nbytes
            header = json.dumps(entries, separators=(",", ":")).encode()
            header += b" " * (-len(header) % 8)
            start = 8 + len(header)
            for tensor in members:
                begin = entries[tensor.name]["data_offsets"][0]
                self.slots[tensor.name] = TensorSlot(
                    shard, start + begin, tensor.nbytes, tensor.dtype
                )
            self._headers.append(struct.pack("<Q", len(header)) + header)
            self._sizes.append(start + cursor)

    @property
    def shard_sizes(self) -> tuple[int, ...]:
        """Final size in bytes of each shard file."""
        return tuple(self._sizes)

    def open(self, keep: frozenset[int] = frozenset()) -> None:
        """Create every shard file and write its header; shards in `keep` are left as they
        are. Files are closed again: a shard is opened when first written and closed once
        finished, so a run holds a few descriptors however many shards it writes."""
        try:
            for index, (name, header) in enumerate(zip(self.shard_names, self._headers)):
                if index in keep:
                    continue
                fd = os.open(self.folder / name, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
                try:
                    _pwrite_all(fd, header, 0)
                finally:
                    os.close(fd)
                if self.digest:
                    self._digests[index] = hashlib.sha256(header)
                    self._hashed[index] = len(header)
        except OSError as exc:
            raise output_error(exc) from None

    def finish_shard(self, index: int) -> str | None:
        """Mark one shard complete and start flushing it on a background thread (the disk
        writes overlap the math of the next shards; `close` waits for them); return its
        sha256 when every byte was hashed in order."""
        fd = self._fd(index)
        del self._fds[index]
        self._sync(_fsync_close, fd)
        if self._hashed.get(index) != self._sizes[index]:
            return None
        return self._digests[index].hexdigest()  # type: ignore[no-any-return]

    def write(self, name: str, tensor: torch.Tensor, byte_offset: int = 0) -> None:
        """Write `tensor` (already in its output dtype) at its slot and hash it; a part of
        the tensor (a block of rows) goes `byte_offset` bytes into the slot."""
        self.put(name, tensor, byte_offset)
        self.absorb(name, tensor, byte_offset)

    def put(self, name: str, tensor: torch.Tensor, byte_offset: int = 0) -> None:
        """Write without hashing: any thread, any order (each tensor has its own bytes)."""
        slot, data = self._bytes(name, tensor, byte_offset)
        if data.nbytes:
            try:
                _pwrite_all(self._fd(slot.shard), data.data, slot.offset + byte_offset)
            except OSError as exc:
                raise output_error(exc) from None

    def absorb(self, name: str, tensor: torch.Tensor, byte_offset: int = 0) -> None:
        """Hash what `put` wrote, from one thread in file order (else the shard is re-read)."""
        slot, data = self._bytes(name, tensor, byte_offset)
        if data.nbytes:
            self._hash(slot.shard, slot.offset + byte_offset, data.data)
            self._flush_early(slot.shard, data.nbytes)

    def _flush_early(self, shard: int, nbytes: int) -> None:
        # the kernel holds written pages until `close` unless they pass its dirty limits
        # (10% of RAM), so the run would end waiting for the whole shard to reach the
        # disk: every FLUSH_BYTES, the pages so far are flushed in the background
        self._unflushed[shard] = self._unflushed.get(shard, 0) + nbytes
        running = self._flushing.get(shard)
        if self._unflushed[shard] < FLUSH_BYTES or (running is not None and not running.done()):
            return
        self._unflushed[shard] = 0
        self._flushing[shard] = self._sync(_datasync, self._fd(shard))

    def _fd(self, shard: int) -> int:
        """The open descriptor of `shard`, opened on first use (any thread)."""
        with self._open_lock:
            fd = self._fds.get(shard)
            if fd is None:
                fd = self._fds[shard] = os.open(self.folder / self.shard_names[shard], os.O_RDWR)
            return fd

    def _sync(self, flush: Any, fd: int) -> Future[None]:
        if self._syncer is None:
            self._syncer = ThreadPoolExecutor(max_workers=1)
        future = self._syncer.submit(flush, fd)
        self._syncs.append(future)
        return future

    def _bytes(self, name: str, tensor: torch.Tensor, byte_offset: int) -> tuple[TensorSlot, Any]:
        slot = self.slots[name]
        if tensor.dtype != CODE_TO_TORCH[slot.dtype]:
            raise ValueError(f"{name}: got {tensor.dtype}, planned {slot.dtype}")
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        if byte_offset + data.nbytes > slot.nbytes:
            raise ValueError(
                f"{name}: {data.nbytes} bytes at {byte_offset} overflow the {slot.nbytes} planned"
            )
        return slot, data

    def _hash(self, shard: int, offset: int, data: memoryview) -> None:
        if self._hashed.get(shard) == offset:
            self._digests[shard].update(data)
            self._hashed[shard] = offset + data.nbytes
        else:
            self._hashed[shard] = -1

    def close(self) -> None:
        """Flush and close every shard file (waiting for the background flushes)."""
        error = self._wait_syncs()
        for fd in self._fds.values():
            try:
                os.fsync(fd)
            except OSError as exc:
                error = error or exc
        self._close_all()
        if error is not None:
            raise output_error(error)

    def abort(self) -> None:
        """Close without flushing (the folder is about to be removed)."""
        self._wait_syncs()
        self._close_all()

    def _wait_syncs(self) -> OSError | None:
        error = None
        for future in self._syncs:
            failed = future.exception()
            if isinstance(failed, OSError):
                error = error or failed
        if self._syncer is not None:
            self._syncer.shutdown()
        self._syncs, self._syncer = [], None
        return error

    def _close_all(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}

    def index(self) -> dict[str, Any]:
        """The `model.safetensors.index.json` document."""
        total = sum(slot.nbytes for slot in self.slots.values())
        weight_map = {name: self.shard_names[slot.shard] for name, slot in self.slots.items()}
        return {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}


def _fsync_close(fd: int) -> None:
    """Flush a finished shard to disk and close it (closed even when the flush fails)."""
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def output_error(exc: OSError) -> OutputError:
    """An OSError met while writing the output, as the error the user sees (exit 5)."""
    import errno

    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return OutputError(
            f"disk full while writing the output ({exc.strerror})",
            hint="free space or choose another -o folder",
        )
    return OutputError(
        f"cannot write the output: {exc.strerror} ({exc.filename or ''})".strip(),
        hint="check permissions of the -o folder",
    )
