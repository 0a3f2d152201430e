"""Versions of the LoRA-weight encoder a registry knows (the ``encoders`` table), no tensors.

A version is registered (its checkpoint copied into ``encoders/``) inactive; it becomes the
active one of its base model only after every LoRA row of that base carries its embedding
(:func:`registry.embed.switch_encoder`), so search never ranks vectors of two encoders together.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from registry.atomic_write import copy_atomically
from registry.store.store import Store, quote

ENCODERS_DIR = "encoders"


@dataclass(frozen=True)
class EncoderRecord:
    """One registered encoder version."""

    version: str
    base_model: str
    path: Path
    info: dict
    active: bool


def _record(store: Store, row: dict) -> EncoderRecord:
    return EncoderRecord(row["version"], row["base_model"], store.root / row["file"],
                         json.loads(row["info"] or "{}"), bool(row["active"]))


def encoder_records(store: Store) -> list[EncoderRecord]:
    """Every registered version (of the store's pinned version, if any)."""
    return [_record(store, row) for row in store.column_rows(store.encoders, list(store.encoders.schema.names))]


def active_encoders(store: Store) -> dict[str, EncoderRecord]:
    """Base model -> its active encoder version."""
    return {r.base_model: r for r in encoder_records(store) if r.active}


def get_encoder(store: Store, version: str) -> EncoderRecord | None:
    rows = store.rows(store.encoders, f"version = {quote(version)}", 1)
    return _record(store, rows[0]) if rows else None


def register_encoder(store: Store, checkpoint: str | os.PathLike, version: str, base_model: str,
                     info: dict) -> EncoderRecord:
    """Copy ``checkpoint`` into the registry as ``version`` (inactive); a no-op if registered."""
    store._writable()
    found = get_encoder(store, version)
    if found is not None:
        return found
    folder = store.root / ENCODERS_DIR
    folder.mkdir(exist_ok=True)
    target = folder / f"{version}.safetensors"
    copy_atomically(checkpoint, target)
    row = {"version": version, "base_model": base_model, "file": str(target.relative_to(store.root)),
           "created_at": datetime.now(timezone.utc), "info": json.dumps(info, sort_keys=True), "active": False}
    store.upsert(store.encoders, [row], "version", update=False)
    return get_encoder(store, version)


def set_active(store: Store, version: str) -> None:
    """Make ``version`` the active encoder of its base model (one table version): call only once
    every row of that base carries its embedding."""
    record = get_encoder(store, version)
    if record is None:
        raise KeyError(f"no encoder version {version!r} in {store.root}")
    rows = [row for row in store.column_rows(store.encoders, list(store.encoders.schema.names))
            if row["base_model"] == record.base_model and (row["active"] or row["version"] == version)]
    for row in rows:
        row["active"] = row["version"] == version
    store.upsert(store.encoders, rows, "version", update=True)
