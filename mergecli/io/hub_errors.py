"""The one table from huggingface_hub's exceptions to mergecli's: matched by type, so an
error that is not the Hub's (a bug) is never reported as "not found"."""

from __future__ import annotations

from huggingface_hub import errors as hub

from mergecli.errors import NotFoundError

try:  # huggingface_hub 1.x and later talk to the Hub through httpx (2.x: httpx2)
    from httpx2 import TransportError
except ImportError:  # pragma: no cover - depends on the installed huggingface_hub
    try:
        from httpx import TransportError  # type: ignore[no-redef]
    except ImportError:
        TransportError = OSError  # type: ignore[misc, assignment]

_HINTS: tuple[tuple[type[BaseException], str], ...] = (
    (hub.GatedRepoError, "accept the model's terms on the Hub and set HF_TOKEN"),
    (hub.RepositoryNotFoundError,
     "check the repo id; private or gated repos need `hf auth login` or HF_TOKEN"),
    (hub.RevisionNotFoundError, "check the branch, tag or commit after `@`"),
    (hub.LocalEntryNotFoundError,
     "offline (HF_HUB_OFFLINE=1) and not in the cache: download it once online, or unset "
     "HF_HUB_OFFLINE"),
    (hub.EntryNotFoundError, "the file is not in the repo at that revision"),
    (hub.OfflineModeIsEnabled, "unset HF_HUB_OFFLINE, or download the model once online"),
    (hub.HfHubHTTPError, "check the network and the repo id"),
    (TransportError,
     "cannot reach the Hub: check the network, or set HF_HUB_OFFLINE=1 to use the local cache"),
    (OSError, "check the network and the repo id"),
)  # fmt: skip

HUB_ERRORS: tuple[type[BaseException], ...] = tuple(kind for kind, _ in _HINTS)


def hub_error(what: str, exc: BaseException) -> NotFoundError:
    """`exc` (one of HUB_ERRORS) as a NotFoundError about `what`, with its hint."""
    hint = next(h for kind, h in _HINTS if isinstance(exc, kind))
    text = str(exc).strip()
    first_line = text.splitlines()[0] if text else type(exc).__name__
    return NotFoundError(f"{what}: {first_line}", hint=hint)
