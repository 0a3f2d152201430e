"""Remaking the stored LoRA rows' text vectors with the current text recipe.

A row's text vector is made when the row is written (ingest, a sidecar refresh, captions) and kept
after: rows written before the recipe changed (the mean of each line's vector instead of one pass
over the whole document; no vector for a document that names nothing, such as a hashed file name)
keep the old vector. :func:`refresh_text_vectors` makes every row's vector again from its stored
search text, in batches, and writes the ones that changed in one commit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from registry.store.store import WRITE_TIMEOUT, Store
from registry.text import embed_documents

BATCH = 256  # documents per text-encoder batch


@dataclass
class TextVectorReport:
    """What :func:`refresh_text_vectors` did: rows read, vectors remade, rows left without one."""

    rows: int = 0
    changed: int = 0
    without_vector: int = 0

    def to_dict(self) -> dict:
        return {"rows": self.rows, "changed": self.changed, "without_vector": self.without_vector}


def _differs(old, new) -> bool:
    if old is None or new is None:
        return (old is None) != (new is None)
    return not np.allclose(np.asarray(old, dtype=np.float32), np.asarray(new, dtype=np.float32), atol=1e-6)


def refresh_text_vectors(store: Store, progress: bool = False) -> TextVectorReport:
    """Make every LoRA row's text vector again from its search text; write those that changed in
    one commit (one table version; none when nothing changed). A row whose search text another
    writer changed meanwhile keeps that writer's vector (the update matches on the text read)."""
    store._writable()
    rows = store.column_rows(store.loras, ["lora_id", "search_text", "text_vector"])
    report, changed = TextVectorReport(rows=len(rows)), []
    for start in tqdm(range(0, len(rows), BATCH), desc="text vectors", unit="batch", disable=not progress):
        batch = rows[start:start + BATCH]
        for row, vector in zip(batch, embed_documents([r["search_text"] or "" for r in batch])):
            report.without_vector += vector is None
            if _differs(row["text_vector"], vector):
                changed.append({"lora_id": row["lora_id"], "search_text": row["search_text"], "text_vector": vector})
    report.changed = len(changed)
    if changed:
        schema = pa.schema([store.loras.schema.field(n) for n in ("lora_id", "search_text", "text_vector")])
        data = pa.Table.from_pylist(changed, schema=schema)
        (store.loras.merge_insert("lora_id")
         .when_matched_update_all(where="target.search_text = source.search_text")
         .execute(data, timeout=WRITE_TIMEOUT, on_bad_vectors="null"))
    return report
