"""Content-addressed blob store: every accepted file is kept once, named by its sha256."""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from pathlib import Path

from registry.store.blob_copy import copy_into


STALE_STAGING_S = 6 * 3600  # a staged copy this old belongs to no live ingest


class BlobStore:
    """Files stored under ``root/ab/cdef….ext``; writes are atomic (temp file + rename)."""

    def __init__(self, root: str | os.PathLike, create: bool = True) -> None:
        self.root = Path(root)
        if create:
            self.root.mkdir(parents=True, exist_ok=True)

    def path_for(self, sha256: str, suffix: str = ".safetensors") -> Path:
        """Where the blob with this hash lives (whether or not it exists yet)."""
        return self.root / sha256[:2] / f"{sha256[2:]}{suffix}"

    def has(self, sha256: str, suffix: str = ".safetensors") -> bool:
        return self.path_for(sha256, suffix).exists()

    def put(self, source: str | os.PathLike, sha256: str, suffix: str = ".safetensors") -> Path:
        """Copy ``source`` in under its (already computed) hash; a no-op when present."""
        target = self.path_for(sha256, suffix)
        if target.exists():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".incoming-")
        try:
            copy_into(source, fd, tmp)  # bypasses the page cache where it can; the hash is known
            os.replace(tmp, target)  # atomic: readers see nothing or the whole file
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return target

    def stage(self, source: str | os.PathLike) -> tuple[str, Path]:
        """Hash ``source`` and copy it to a temp file in the store in one read pass.

        Returns ``(sha256, temp path)``; :meth:`commit` renames the temp file into place,
        :meth:`discard` removes it. Nothing under a blob name exists until ``commit``.
        """
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".incoming-")
        try:
            digest = hashlib.sha256()
            copy_into(source, fd, tmp, digest)
            return digest.hexdigest(), Path(tmp)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    def commit(self, staged: Path, sha256: str, suffix: str = ".safetensors") -> Path:
        """Move a file from :meth:`stage` to its blob name (atomic; a no-op when present)."""
        target = self.path_for(sha256, suffix)
        if target.exists():
            self.discard(staged)
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged, target)  # same file system: readers see nothing or the whole file
        return target

    def remove_stale_staging(self, older_than_s: float = STALE_STAGING_S) -> int:
        """Remove the temp files of :meth:`stage` that a killed process left (older than
        ``older_than_s``: a live ingest renames or removes its own within seconds); returns how many."""
        removed, cutoff = 0, time.time() - older_than_s
        for entry in os.scandir(self.root):  # staging files live in the root only: a cheap listing
            try:
                if entry.name.startswith(".incoming-") and entry.is_file() and entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)
                    removed += 1
            except FileNotFoundError:  # another process removed it first
                continue
        return removed

    @staticmethod
    def discard(staged: Path | None) -> None:
        """Remove a staged temp file (if it is still there)."""
        if staged is not None:
            try:
                os.unlink(staged)
            except FileNotFoundError:
                pass
