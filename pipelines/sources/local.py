"""Local folders as a LoRA source (ComfyUI ``models/loras``, A1111 ``models/Lora``: LoRA files
with sidecar ``.json`` cards, ``.civitai.info`` and previews, read by the shared ingest).

The cursor maps each LoRA file to a short digest of its size, mtime and its sidecars' stats,
so a new file, a rewritten one, or one whose card or preview changed is a candidate again;
a deleted file drops out of the cursor. Nothing is copied: ``fetch`` returns the file itself.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from typing import TYPE_CHECKING

from pipelines.sources.base import Candidate, Cursor, RemoteFile, SourceError
from registry.ingest import CANDIDATE_SUFFIXES
from registry.lora.metadata import sidecar_files, sidecar_signature

if TYPE_CHECKING:
    from pipelines.sources.civitai import CivitaiSource


DEMO_LORAS = ".autolora/world/default-seed0/loras"  # bin/demo's world (pipelines.world.build: OUT/SIZE-seedN/loras)


class LocalSource:
    """LoRA files under ``folder`` (walked; symlinked folders are not followed)."""

    in_place = True  # sync ingests the files where they are

    def __init__(self, folder: str | os.PathLike, name: str = "local", enricher: CivitaiSource | None = None) -> None:
        self.folder, self.name = Path(folder).expanduser().absolute(), name  # absolute: ids are file URIs
        self.enricher = enricher  # new files without a card get one from Civitai, by sha256
        self.skipped: list[str] = []  # what the last discover could not consider, and why

    def discover(self, cursor: Cursor | None) -> tuple[list[Candidate], Cursor]:
        """Files new or changed since ``cursor`` (``{"files": {path: digest}}``); a folder that does
        not exist raises :class:`SourceError` (``missing``) and leaves the cursor as it was."""
        if not self.folder.is_dir():
            what = "is not a folder" if self.folder.exists() else "does not exist"
            raise SourceError("missing", f"folder {self.folder} {what}")
        seen: dict[str, str] = dict((cursor or {}).get("files", {}))
        now: dict[str, str] = {}
        found = []
        self.skipped = []
        for path, stat, siblings in _lora_files(self.folder, self.skipped):
            digest = _digest(path, stat, siblings)
            now[str(path)] = digest
            if seen.get(str(path)) != digest:
                found.append(Candidate(source=self.name, id=str(path), revision=digest, name=path.stem,
                                       files=[RemoteFile(path.name, path.as_uri(), stat.st_size)],
                                       page_url=path.as_uri()))
        return found, {"files": now}

    @staticmethod
    def forget(cursor: Cursor, ids: list[str]) -> Cursor:
        """``cursor`` without the files ``ids`` (candidate ids: paths), so the next
        :meth:`discover` finds them again (e.g. a file rejected for a base not yet registered)."""
        gone = set(ids)
        files = {path: digest for path, digest in (cursor or {}).get("files", {}).items() if path not in gone}
        return {**(cursor or {}), "files": files}

    def enrich(self, found: list[Candidate], cursor: Cursor) -> tuple[Cursor, list[str], list[str]]:
        """Give the files of ``found`` that have no card one from :attr:`enricher` (Civitai, by sha256:
        :func:`pipelines.sources.civitai_enrich.enrich_by_hash`). Returns the cursor with their new digests,
        the cards written and warnings; a file whose lookup failed is left out of the cursor (looked up
        again next time), and after a network failure the rest wait for the next sync too."""
        from pipelines.sources.civitai_enrich import enrich_by_hash

        files, written, warnings = dict((cursor or {}).get("files", {})), [], []
        for i, candidate in enumerate(found if self.enricher is not None else []):
            try:
                card = enrich_by_hash(candidate.id, self.enricher)
            except SourceError as error:
                warnings.append(f"enrich {candidate.id} from Civitai: {error} (looked up again next sync)")
                stop = error.code == "network"
                for later in (found[i:] if stop else [candidate]):
                    files.pop(later.id, None)
                if stop:
                    break
                continue
            if card is not None:
                written.append(str(card))
                path = Path(candidate.id)
                files[candidate.id] = _digest(path, path.stat(), sorted(os.listdir(path.parent)))
        return {**(cursor or {}), "files": files}, written, warnings

    def fetch(self, candidate: Candidate, file: RemoteFile, dest_dir: Path) -> Path:
        """The local file itself (nothing is copied; ``dest_dir`` is unused)."""
        path = Path(candidate.id)
        if not path.is_file():
            raise SourceError("vanished", f"{path} is gone")
        return path


def changed_files(folder: str | os.PathLike, cursor: str | None) -> tuple[list[str], str]:
    """For a Dagster sensor: the paths of new or changed LoRA files under ``folder`` and the new
    cursor, both as the sensor keeps them (sorted paths, a JSON string)."""
    found, new = LocalSource(folder).discover(json.loads(cursor) if cursor else None)
    return sorted(c.id for c in found), json.dumps(new, sort_keys=True)


def _lora_files(folder: Path, skipped: list[str]):
    """LoRA-named regular files under ``folder``; what cannot be one (a dangling or looping link,
    a FIFO or device, an unreadable folder) goes to ``skipped`` with the reason, as ingest says it."""
    def unreadable(error: OSError) -> None:
        skipped.append(f"skipped {error.filename or folder}: unreadable folder: {error.strerror}")

    for root, dirs, names in os.walk(folder, onerror=unreadable):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))  # e.g. a sync's .staging
        siblings = sorted(names)
        for name in siblings:
            if Path(name).suffix.lower() not in CANDIDATE_SUFFIXES:
                continue
            path = Path(root) / name
            try:
                stat = path.stat()
            except FileNotFoundError:  # vanished since the listing, or a dangling link
                if path.is_symlink():
                    skipped.append(f"skipped {path}: a symlink that is dangling or loops")
                continue
            except OSError as error:  # a looping link, an unreadable entry
                skipped.append(f"skipped {path}: {error.strerror or error}")
                continue
            if path.is_file():
                yield path, stat, siblings
            else:
                skipped.append(f"skipped {path}: neither a regular file nor a folder")


def _digest(path: Path, stat: os.stat_result, siblings: list[str]) -> str:
    sidecars = sidecar_signature(sidecar_files(path, siblings))
    return hashlib.sha1(f"{stat.st_size}\0{stat.st_mtime_ns}\0{sidecars}".encode()).hexdigest()[:16]
