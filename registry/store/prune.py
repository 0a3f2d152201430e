"""Mark what has vanished from disk: a file record whose path is gone, and a LoRA whose every
known path is gone (``removed``; search hides it by default), a LoRA left with no path at all
included (its file was overwritten in place by another LoRA: the path's record moved to that
one). A path that comes back is unmarked again. Nothing is deleted: blobs and rows stay, so a
pinned version still reads."""

from __future__ import annotations

import os
from collections import defaultdict

from registry.store.store import Store, where_in

_CHUNK = 1000  # ids per SQL IN list


def _set(table, column: str, key: str, ids: list[str], value: bool) -> None:
    for start in range(0, len(ids), _CHUNK):
        table.update(where=where_in(key, ids[start:start + _CHUNK]), values={column: value})


def prune(store: Store) -> dict[str, int]:
    """Refresh ``files.gone`` and ``loras.removed`` from the file system; returns counts."""
    store._writable()
    # the LoRAs first: one an ingest writes meanwhile gets its file record after its row, so it is
    # either not read here or read with its record (a run killed between the two is unmarked by its rerun)
    loras = store.column_rows(store.loras, ["lora_id", "removed"])
    files = store.column_rows(store.files, ["path", "lora_id", "gone"])
    present: dict[str, bool] = defaultdict(bool)
    newly_gone, back = [], []
    for row in files:
        exists = os.path.exists(row["path"])
        present[row["lora_id"]] |= exists
        if exists and row["gone"]:
            back.append(row["path"])
        elif not exists and not row["gone"]:
            newly_gone.append(row["path"])
    _set(store.files, "gone", "path", newly_gone, True)
    _set(store.files, "gone", "path", back, False)
    removed = [r["lora_id"] for r in loras if not present[r["lora_id"]] and not r["removed"]]
    restored = [r["lora_id"] for r in loras if present.get(r["lora_id"]) and r["removed"]]
    _set(store.loras, "removed", "lora_id", removed, True)
    _set(store.loras, "removed", "lora_id", restored, False)
    return {"paths_gone": len(newly_gone), "paths_back": len(back), "removed": len(removed),
            "restored": len(restored), "loras": len(loras)}
