"""The files an ingest looks at: given files and folders expanded into candidate LoRA files."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from registry.ingest.report import IngestReport
from registry.store.store import MARKER, holds_registry, user_path

# Files that may be LoRAs when found while walking a folder (everything else there is a sidecar).
# An explicitly named file is always considered, whatever its extension.
CANDIDATE_SUFFIXES = {".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle", ".lora"}


@dataclass
class Candidate:
    """A file to ingest, with the sorted names of its folder (for its sidecars)."""

    path: Path
    siblings: list[str]


def _walk(folder: Path, report: IngestReport) -> list[Candidate]:
    """Candidate files under ``folder`` (symlinked folders are not followed, so no loops);
    unreadable folders and broken or looping links are reported, never skipped silently."""
    found = []

    def unreadable(error: OSError) -> None:
        report.reject(str(error.filename or folder), "unreadable", f"unreadable folder: {error.strerror}")

    for root, dirs, names in os.walk(folder, onerror=unreadable):
        if MARKER in names and holds_registry(Path(root)):  # its blobs are copies of LoRAs it holds already
            dirs[:] = []
            report.warnings.append(f"skipped {root}: an autolora registry, not a folder of LoRAs")
            continue
        dirs.sort()
        siblings = sorted(names)
        for name in siblings:
            if Path(name).suffix.lower() not in CANDIDATE_SUFFIXES:
                continue
            path = Path(root) / name
            if path.is_file():
                found.append(Candidate(path, siblings))
            elif path.is_symlink():
                report.reject(str(path), "broken_link", "a symlink that is dangling or loops")
            else:  # a FIFO, socket or device named like a LoRA
                report.reject(str(path), "not_a_file", "neither a regular file nor a folder")
    if not found:
        report.warnings.append(f"no LoRA files found under {folder} "
                               f"(looked for {', '.join(sorted(CANDIDATE_SUFFIXES))})")
    return found


def collect_candidates(paths: str | os.PathLike | Iterable[str | os.PathLike],
                       report: IngestReport) -> list[Candidate]:
    """Expand the given files and folders (``~`` and ``$VARS`` expanded; one path alone is one
    path, not a list of its letters) into candidates, sorted, without repeats. A path that does not
    exist raises ``FileNotFoundError`` before anything is done; problems inside walked folders go
    into ``report``."""
    given = [user_path(p) for p in ([paths] if isinstance(paths, (str, bytes, os.PathLike)) else paths)]
    missing = [str(p) for p in given if not os.path.lexists(p)]
    if missing:
        raise FileNotFoundError(f"no such file or folder: {', '.join(missing)}")
    found: dict[str, Candidate] = {}
    for path in given:
        if path.is_dir():
            for candidate in _walk(path, report):
                found.setdefault(os.path.realpath(candidate.path), candidate)
        elif path.is_file():
            found.setdefault(os.path.realpath(path), Candidate(path, _listing(path.parent)))
        elif path.is_symlink():
            report.reject(str(path), "broken_link", "a symlink that is dangling or loops")
        else:
            report.reject(str(path), "not_a_file", "neither a regular file nor a folder")
    return [found[key] for key in sorted(found)]


def _listing(folder: Path) -> list[str]:
    try:
        return sorted(os.listdir(folder))
    except OSError:
        return []
