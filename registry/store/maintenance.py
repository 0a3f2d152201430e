"""Index maintenance, run from one place: the CLI after an ingest, or a Dagster asset.

Ingest only *creates* indexes that are missing (cheap on a new table); refreshing them (folding
new rows into the FTS and vector indexes, compacting fragments, dropping old manifests) is
:func:`maintain`. It is safe beside concurrent ingests: LanceDB's optimistic commits either
rebase (appends beside a compaction) or fail this step, which then yields and is reported; a
later run picks it up. Nothing is ever half-written.
"""

from __future__ import annotations

import time
from collections.abc import Collection
from dataclasses import dataclass, field

from lancedb.index import FTS, BTree, HnswSq

from registry.store import search
from registry.store.schema import FULL_TEXT_COLUMN
from registry.store.store import Store

# Every column an ingest looks a row up by (no table scans on the ingest path).
SCALAR_INDEXES: dict[str, tuple[str, ...]] = {
    "loras": ("lora_id", "encoder_version"),
    "files": ("path", "sha256", "lora_id", "size_bytes"),
    "rejections": ("rejection_id",),
    "encoders": ("version",),
}
VECTOR_COLUMNS = ("text_vector", "weight_vector")  # on the LoRA table; rows without one are skipped
# Below this many rows a lookup scans a few kB: an index would cost more to make than it saves.
SCALAR_INDEX_MIN_ROWS = 1000
_LANCE_ERRORS = (RuntimeError, OSError, ValueError)


@dataclass
class MaintenanceReport:
    """What one :func:`maintain` did; ``yielded`` lists steps that lost a race and were left."""

    created: list[str] = field(default_factory=list)
    optimized: list[str] = field(default_factory=list)
    yielded: list[str] = field(default_factory=list)
    stale_staging_removed: int = 0  # partial blob copies of killed ingests
    orphan_blobs_removed: int = 0  # LoRA blobs no row refers to (only with collect_blobs)
    orphan_bytes_freed: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"created": self.created, "optimized": self.optimized, "yielded": self.yielded,
                "stale_staging_removed": self.stale_staging_removed,
                "orphan_blobs_removed": self.orphan_blobs_removed, "orphan_bytes_freed": self.orphan_bytes_freed,
                "seconds": round(self.seconds, 3)}


def _existing(table) -> set[str]:
    return {column for index in table.list_indices() for column in index.columns}


def ensure_indexes(store: Store, *, tables: Collection[str] | None = None, vector: bool = False,
                   yielded: list[str] | None = None) -> list[str]:
    """Create the missing scalar and full-text indexes of ``tables`` (names; None: every table)
    and, with ``vector``, the vector index once the LoRA table is large enough; returns
    ``table.column`` of each one created. One that a concurrent process is creating at the same
    moment is left to it (noted in ``yielded``). An ingest names the tables it wrote to: one it
    did not grow has nothing new to index (each look costs a LanceDB call)."""
    created = []
    for name, table in store._tables().items():
        if tables is not None and name not in tables:
            continue
        rows = table.count_rows()
        if rows == 0 or (rows < SCALAR_INDEX_MIN_ROWS and name != "loras"):
            continue  # nothing to make yet (the LoRA table's FTS index is made at once)
        have = _existing(table)
        wanted = [(c, BTree()) for c in SCALAR_INDEXES[name]
                  if c not in have and rows >= SCALAR_INDEX_MIN_ROWS]
        if name == "loras" and FULL_TEXT_COLUMN not in have:  # a registry made before it came with the table
            wanted.append((FULL_TEXT_COLUMN, FTS()))
        for column in VECTOR_COLUMNS if name == "loras" and vector else ():
            filled = table.count_rows(f"{column} IS NOT NULL") if column not in have else 0
            if filled >= search.VECTOR_INDEX_MIN_ROWS:
                wanted.append((column, HnswSq(
                    distance_type="cosine", ef_construction=search.ANN_EF_CONSTRUCTION,
                    num_partitions=max(1, filled // search.VECTOR_PARTITION_ROWS))))
        for column, config in wanted:
            try:
                table.create_index(column, config=config, name=f"{column}_idx")
                created.append(f"{name}.{column}")
            except _LANCE_ERRORS as error:  # a concurrent commit won; it made the same index
                if yielded is not None:
                    yielded.append(f"index {name}.{column}: {error}"[:300])
    return created


def maintain(store: Store, collect_blobs: bool = False) -> MaintenanceReport:
    """Create missing indexes (the vector index too, past its threshold), then optimize every
    table: compact, fold new rows into every index, prune old versions (tags are kept); remove
    the partial blob copies killed ingests left and, with ``collect_blobs`` (a walk of the whole
    blob store: explicit maintenance, not after every ingest), the LoRA blobs no row refers to."""
    store._writable()
    report, start = MaintenanceReport(), time.perf_counter()
    report.created = ensure_indexes(store, vector=True, yielded=report.yielded)
    for name, table in store._tables().items():
        try:
            table.optimize()
            report.optimized.append(name)
        except _LANCE_ERRORS as error:  # a concurrent commit won: leave it for the next run
            report.yielded.append(f"optimize {name}: {error}"[:300])
    report.stale_staging_removed = store.blobs.remove_stale_staging(whole_store=collect_blobs)
    if collect_blobs:
        referenced = {row["blob"] for row in store.column_rows(store.loras, ["blob"])}
        report.orphan_blobs_removed, report.orphan_bytes_freed = store.blobs.remove_unreferenced(
            {str(store.root / blob) for blob in referenced})
    report.seconds = time.perf_counter() - start
    return report
