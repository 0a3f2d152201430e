"""Where a registry keeps each source's sync cursor (``REGISTRY/sync/SOURCE.cursor.json``): read
and written by ``autolora sync`` and the Dagster source sensors alike, so a cursor says what *that*
registry has seen."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

from pipelines.sources.base import safe_name
from registry.atomic_write import write_atomically

CURSOR_DIR = "sync"  # in the registry folder


def cursor_path(registry_root: str | os.PathLike, source: str) -> Path:
    """Where the registry at ``registry_root`` keeps ``source``'s cursor:
    ``REGISTRY/sync/SOURCE.cursor.json`` (a name that is no plain file name gets a short hash, so two
    sources never share a cursor)."""
    stem = safe_name(source)
    if stem != source:
        stem = f"{stem}-{hashlib.sha1(source.encode()).hexdigest()[:8]}"
    return Path(registry_root) / CURSOR_DIR / f"{stem}.cursor.json"


def load_cursor(path: Path) -> dict | None:
    """The kept cursor, or ``None`` (from the start) where there is none or it cannot be read."""
    try:
        cursor = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        print(f"warning: unreadable cursor {path} ({error}): syncing that source from the start", file=sys.stderr)
        return None
    return cursor if isinstance(cursor, dict) else None


def save_cursor(path: Path, cursor: dict) -> None:
    """Written whole or not at all (a crash mid-write keeps the previous cursor)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, json.dumps(cursor))
