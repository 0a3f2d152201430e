"""The interface every LoRA source implements, and the records it hands over.

A source *discovers* candidates (one LoRA release each: a Hub repo at a commit, a Civitai model
version, a local file) and *fetches* their files. Validation, dedup and registration are not a
source's job: :func:`pipelines.sources.sync.sync` writes what was fetched into a folder and the
shared ingest (``Registry.add``) takes it from there.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

Cursor = dict[str, Any]  # JSON-able; ``None`` / ``{}`` means "from the start"


class SourceError(Exception):
    """A candidate or file that could not be fetched. ``code`` is one of ``vanished`` (gone
    between listing and download), ``sha256_mismatch``, ``size_mismatch`` (not the size promised),
    ``too_large``, ``http`` (an error status after retries; ``status`` says which), ``network``
    (connection lost after retries), ``unsupported``, ``missing`` (a local folder that does not exist)."""

    def __init__(self, code: str, reason: str, status: int | None = None) -> None:
        super().__init__(f"{code}: {reason}")
        self.code, self.reason, self.status = code, reason, status

    @property
    def retryable(self) -> bool:
        """Whether a later sync may succeed without anything changing here: a network blip, a server
        error, a rate limit, or a 401/403 (a token set later, an early-access period that ends)."""
        if self.code == "network":
            return True
        return self.code == "http" and (self.status is None or self.status >= 500 or self.status in RETRIED_4XX)


RETRIED_4XX = (401, 403, 408, 429)


@dataclass
class RemoteFile:
    """One downloadable file; ``size`` and ``sha256`` are what the source promised (or None)."""

    name: str
    url: str
    size: int | None = None
    sha256: str | None = None


@dataclass
class Render:
    """A sample image the author published, with the prompt that made it."""

    file: RemoteFile
    prompt: str = ""
    nsfw_level: str = ""


@dataclass
class Candidate:
    """One LoRA release found by a source, pinned to a revision (commit sha, version id, or a
    local file's size+mtime)."""

    source: str
    id: str
    revision: str
    name: str
    files: list[RemoteFile]
    trigger_words: list[str] = field(default_factory=list)
    renders: list[Render] = field(default_factory=list)
    licence: str = ""
    nsfw_level: str = ""
    base_model: str = ""
    page_url: str = ""
    description: str = ""
    tags: list[str] = field(default_factory=list)

    @property
    def key(self) -> str:
        """``source:id@revision``: unique per release."""
        return f"{self.source}:{self.id}@{self.revision}"

    @property
    def folder_name(self) -> str:
        """A filesystem-safe, stable folder name for this release."""
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{self.id}@{self.revision}")[:80].strip("._") or "x"
        return f"{slug}-{hashlib.sha1(self.key.encode()).hexdigest()[:8]}"

    def to_dict(self) -> dict:
        """JSON-able form (kept in cursors for retries)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Candidate":
        """Inverse of :meth:`to_dict`."""
        data = dict(data)
        data["files"] = [RemoteFile(**f) for f in data.get("files", [])]
        data["renders"] = [Render(file=RemoteFile(**r["file"]), prompt=r.get("prompt", ""),
                                  nsfw_level=r.get("nsfw_level", "")) for r in data.get("renders", [])]
        return cls(**data)


@runtime_checkable
class Source(Protocol):
    """What :func:`pipelines.sources.sync.sync` needs from a source. Optional attributes it reads
    after :meth:`discover`: ``failures`` (releases the listing named but that could not be read:
    ``{key, file, code, reason, retry}`` each, the source lists them again next time), ``listed_all``
    (when the listing was complete: ``{(id, revision)}`` of every release upstream, ``revision``
    ``None`` for "any revision"; else ``None``) and the class attribute ``superseding_revisions``
    (a new revision of an id replaces the old one, as a Hub repo's commit does)."""

    name: str

    def discover(self, cursor: Cursor | None) -> tuple[list[Candidate], Cursor]:
        """Candidates new or changed since ``cursor``, and the cursor to pass next time."""
        ...

    def fetch(self, candidate: Candidate, file: RemoteFile, dest_dir: Path) -> Path:
        """Download ``file`` of ``candidate`` into ``dest_dir`` (resuming a partial download
        left there), verified against its size and sha256; raises :class:`SourceError`."""
        ...


def safe_name(name: str) -> str:
    """A file name with no folder parts or odd characters (remote names are untrusted)."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    base = re.sub(r"[^A-Za-z0-9._ -]+", "_", base).strip(" .")
    return base[:150] or "file"
