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
            os.utime(target)  # reused now: not an orphan for remove_unreferenced
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
            os.utime(target)  # reused now: not an orphan for remove_unreferenced
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged, target)  # same file system: readers see nothing or the whole file
        return target

    def remove_unreferenced(self, referenced: set[str], suffix: str = ".safetensors",
                            older_than_s: float = STALE_STAGING_S) -> tuple[int, int]:
        """Remove the blobs named ``*suffix`` whose paths are not in ``referenced`` and that were
        not written or reused for ``older_than_s`` (an ingest in flight commits its blob before its
        row: :meth:`commit` and :meth:`put` refresh a reused blob's time); returns (count, bytes).
        LoRA rows are never deleted, so a LoRA blob no current row names no old version names
        either; render blobs can be, and are left alone."""
        removed = freed = 0
        cutoff = time.time() - older_than_s
        for folder in os.scandir(self.root):
            if not folder.is_dir(follow_symlinks=False):
                continue
            for entry in os.scandir(folder.path):
                try:
                    if (entry.name.endswith(suffix) and not entry.name.startswith(".")
                            and entry.path not in referenced and entry.stat().st_mtime < cutoff):
                        size = entry.stat().st_size
                        os.unlink(entry.path)
                        removed, freed = removed + 1, freed + size
                except FileNotFoundError:
                    continue
        return removed, freed

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
