"""Where a model's files come from: a local folder or a Hugging Face Hub repo.

A Hub reference is resolved to a commit once; files are fetched on demand through
`huggingface_hub` into the standard cache, so validation downloads only configs, indexes
and headers, and the executor downloads only the shards it reads. `HF_HUB_OFFLINE=1`
resolves everything from the cache; `HF_TOKEN` is used by `huggingface_hub` and never
printed or stored.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from mergecli.errors import CorruptFileError, NotFoundError
from mergecli.io.header import Header, HeaderEntry, read_header
from mergecli.io.hub_errors import HUB_ERRORS, hub_error
from mergecli.recipe.schema import ModelRef

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


class ModelSource(Protocol):
    """Access to one model's files."""

    label: str
    commit: str | None

    def files(self) -> list[str]:
        """Every file name (relative path) in the model."""
        ...

    def local(self, filename: str) -> Path:
        """A local path of `filename`, downloading it first if needed."""
        ...

    def header(self, filename: str) -> Header:
        """The safetensors header of `filename` (downloading at most the header)."""
        ...


@dataclass
class LocalSource:
    """A model in a local folder (or, with `only`, the one `.safetensors` file named)."""

    root: Path
    label: str
    commit: str | None = None
    only: str | None = None

    def files(self) -> list[str]:
        """Files below the folder, as relative POSIX paths."""
        if self.only is not None:
            return [self.only]
        return sorted(
            p.relative_to(self.root).as_posix() for p in self.root.rglob("*") if p.is_file()
        )

    def local(self, filename: str) -> Path:
        """The file's path; NotFoundError when it is missing, CorruptFileError when the
        name or a link leads outside the model folder."""
        path = self.root / filename
        if not path.is_file() or (self.only is not None and filename != self.only):
            raise NotFoundError(f"{self.label}: file {filename} not found in {self.root}")
        inside(self.label, self.root, path, filename)
        return path

    def header(self, filename: str) -> Header:
        """The header read from the local file."""
        return read_header(self.local(filename))


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache, honouring HF_HUB_CACHE and HF_HOME at call time."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(
        os.path.expanduser("~"), ".cache", "huggingface"
    )
    return Path(home) / "hub"


def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE is set to a true value."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


@dataclass
class HubSource:
    """A model in a Hub repo, pinned to one commit."""

    repo_id: str
    commit: str | None
    label: str
    cache_dir: Path
    offline: bool
    _files: list[str] | None = field(default=None, repr=False)

    def _snapshot(self) -> Path:
        return _repo_cache(self.cache_dir, self.repo_id) / "snapshots" / str(self.commit)

    def files(self) -> list[str]:
        """Files of the repo at the pinned commit (from the cache when offline)."""
        if self._files is None:
            if self.offline:
                snap = self._snapshot()
                self._files = sorted(
                    p.relative_to(snap).as_posix() for p in snap.rglob("*") if p.is_file()
                )
            else:
                from huggingface_hub import HfApi

                try:
                    self._files = sorted(
                        HfApi().list_repo_files(self.repo_id, revision=self.commit)
                    )
                except HUB_ERRORS as exc:
                    raise hub_error(self.label, exc) from None
        return self._files

    def local(self, filename: str) -> Path:
        """Download `filename` into the cache (or find it there) and return its path."""
        from huggingface_hub import hf_hub_download

        try:
            return Path(
                hf_hub_download(
                    self.repo_id,
                    filename,
                    revision=self.commit,
                    cache_dir=self.cache_dir,
                    local_files_only=self.offline,
                )
            )
        except HUB_ERRORS as exc:
            raise hub_error(f"{self.label}: {filename}", exc) from None

    def header(self, filename: str) -> Header:
        """The header from the cached file, else fetched alone by HTTP range requests."""
        cached = self._snapshot() / filename
        if cached.is_file() or self.offline:
            return read_header(self.local(filename))
        from huggingface_hub import get_safetensors_metadata

        try:
            meta = get_safetensors_metadata(self.repo_id, revision=self.commit)
        except HUB_ERRORS as exc:
            raise hub_error(self.label, exc) from None
        file_meta = meta.files_metadata[filename]
        entries = {
            name: HeaderEntry(info.dtype, tuple(info.shape), *info.data_offsets)
            for name, info in file_meta.tensors.items()
        }
        return Header(entries, dict(file_meta.metadata or {}), 0)


def _repo_cache(cache_dir: Path, repo_id: str) -> Path:
    return cache_dir / ("models--" + repo_id.replace("/", "--"))


def inside(label: str, root: Path, path: Path, filename: str) -> None:
    """Refuse `path` (file `filename` of the model in `root`) unless it stays inside `root`
    once links and `..` are resolved; a Hub cache snapshot's links into its repo's
    `blobs/` are inside."""
    real, base = path.resolve(), root.resolve()
    allowed = [base]
    if root.parent.name == "snapshots":
        allowed.append(root.parent.parent.resolve() / "blobs")
    if not any(real == a or a in real.parents for a in allowed):
        raise CorruptFileError(
            f"{label}: {filename} leads outside the model folder (to {real})",
            hint="a model's files must lie inside its folder; copy the file in instead of linking",
        )


def looks_local(path: str) -> bool:
    """True for references that can only be paths (./x, ../x, /x, ~/x, Windows drives,
    a `.safetensors` or `.gguf` file)."""
    return (
        path.startswith(("/", "./", "../", "~", ".\\"))
        or path.endswith((".safetensors", ".gguf"))
        or bool(re.match(r"^[A-Za-z]:[\\/]", path))
    )


def resolve_source(ref: ModelRef, recipe_dir: Path | None = None) -> ModelSource:
    """Find the model `ref` names: a local folder (relative to the working directory, then to
    the recipe's folder) or a Hub repo pinned to a commit. NotFoundError when it is neither."""
    label = str(ref)
    expanded = Path(os.path.expanduser(ref.path))
    candidates = [expanded] if expanded.is_absolute() else [Path.cwd() / expanded]
    if recipe_dir is not None and not expanded.is_absolute():
        candidates.append(recipe_dir / expanded)
    for candidate in candidates:
        if candidate.is_file() and candidate.suffix in (".safetensors", ".gguf"):
            if ref.revision:
                raise NotFoundError(
                    f"{label}: a revision (@{ref.revision}) only applies to Hub models, "
                    f"but {ref.path} is a local file",
                    hint="remove the @revision",
                )
            if candidate.suffix == ".gguf":
                from mergecli.io.gguf_input import GgufSource

                return GgufSource(candidate.resolve(), label)
            return LocalSource(candidate.resolve().parent, label, only=candidate.name)
        if candidate.is_dir():
            if ref.revision:
                raise NotFoundError(
                    f"{label}: a revision (@{ref.revision}) only applies to Hub models, "
                    f"but {ref.path} is a local folder",
                    hint="remove the @revision",
                )
            return LocalSource(candidate.resolve(), label)
    if looks_local(ref.path) or not _HUB_ID.match(ref.path):
        tried = ", ".join(str(c) for c in candidates)
        raise NotFoundError(
            f"{label}: local folder not found (looked in {tried})",
            hint="check the path; relative paths are read from the working directory, "
            "then from the recipe's folder",
        )
    return _resolve_hub(ref, label)


def _resolve_hub(ref: ModelRef, label: str) -> HubSource:
    cache_dir, offline = hub_cache_dir(), hub_offline()
    revision = ref.revision or "main"
    if offline:
        commit = _cached_commit(cache_dir, ref.path, revision)
        if commit is None:
            raise NotFoundError(
                f"{label}: not in the local cache at {cache_dir} and HF_HUB_OFFLINE is set",
                hint="download the model once online (or unset HF_HUB_OFFLINE); "
                "HF_HUB_CACHE/HF_HOME choose the cache folder",
            )
        return HubSource(ref.path, commit, label, cache_dir, offline)
    from huggingface_hub import HfApi

    try:
        info = HfApi().model_info(ref.path, revision=ref.revision)
    except HUB_ERRORS as exc:
        raise hub_error(label, exc) from None
    return HubSource(ref.path, info.sha, label, cache_dir, offline)


def _cached_commit(cache_dir: Path, repo_id: str, revision: str) -> str | None:
    repo = _repo_cache(cache_dir, repo_id)
    if _COMMIT.match(revision) and (repo / "snapshots" / revision).is_dir():
        return revision
    ref_file = repo / "refs" / revision
    if ref_file.is_file():
        commit = ref_file.read_text().strip()
        if (repo / "snapshots" / commit).is_dir():
            return commit
    return None
