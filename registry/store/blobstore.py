"""Content-addressed blob store: every accepted file is kept once, named by its sha256."""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from pathlib import Path

from registry.store.blob_copy import copy_into


STALE_STAGING_S = 6 * 3600  # a staged copy this old belongs to no live ingest
STAGING = ".incoming-"  # temp files of blobs being written
REMOVING = ".removing-"  # a blob renamed aside while its removal is checked


def _remove_if_still_stale(blob: Path, cutoff: float) -> int | None:
    """Remove ``blob`` unless an ingest reuses it meanwhile: it is renamed aside first (an ingest that
    looks for it now finds none and writes it again), then its time is looked at once more (an ingest
    that touched it just before keeps it: it is put back). Returns its size if removed."""
    aside = blob.with_name(REMOVING + blob.name)
    os.replace(blob, aside)
    st = aside.stat()
    if st.st_mtime >= cutoff:
        os.replace(aside, blob)  # (an ingest that wrote it again meanwhile wrote the same bytes)
        return None
    os.unlink(aside)
    return st.st_size


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
        if self._reused(target):
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=STAGING)  # in the root: remove_stale_staging looks there
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
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=STAGING)
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
        if self._reused(target):
            self.discard(staged)
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged, target)  # same file system: readers see nothing or the whole file
        return target

    @staticmethod
    def _reused(target: Path) -> bool:
        """Whether the blob ``target`` is there to be reused; its time is refreshed so that
        :meth:`remove_unreferenced` keeps it. False when it is missing, or was removed by a
        concurrent clean-up between the look and the touch: then it is written again."""
        try:
            os.utime(target)
            return True
        except FileNotFoundError:
            return False

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
                        size = _remove_if_still_stale(Path(entry.path), cutoff)
                        if size is not None:
                            removed, freed = removed + 1, freed + size
                except FileNotFoundError:
                    continue
        return removed, freed

    def remove_stale_staging(self, older_than_s: float = STALE_STAGING_S, whole_store: bool = False) -> int:
        """Remove the temp files of :meth:`stage` and :meth:`put` that a killed process left in the
        store's root (older than ``older_than_s``: a live ingest renames or removes its own within
        seconds): one cheap listing, run after every ingest. ``whole_store`` (explicit maintenance,
        which walks every blob folder anyway) also removes those that ingests before this version
        left beside the blobs and puts back a blob whose removal by :meth:`remove_unreferenced` was
        cut short. Returns how many temp files went."""
        removed, cutoff = 0, time.time() - older_than_s
        folders = [self.root]
        if whole_store:
            folders += [Path(e.path) for e in os.scandir(self.root) if e.is_dir(follow_symlinks=False)]
        for folder in folders:
            for entry in os.scandir(folder):
                try:
                    if entry.name.startswith(STAGING) and entry.is_file() and entry.stat().st_mtime < cutoff:
                        os.unlink(entry.path)
                        removed += 1
                    elif entry.name.startswith(REMOVING):  # a clean-up killed between its rename and its check
                        os.replace(entry.path, folder / entry.name.removeprefix(REMOVING))
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
