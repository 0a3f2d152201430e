"""The LanceDB registry: tables, upserts, indexes, versions/tags and search."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import lancedb
from lancedb.background_loop import LOOP  # the event loop LanceDB's own sync API runs on
from lancedb.index import FTS, BTree, HnswSq
import pyarrow as pa

from registry.base_models import BaseModel, flux1_dev
from registry.blobstore import BlobStore
from registry.schema import FILES_SCHEMA, REJECTIONS_SCHEMA, TEXT_DIM, loras_schema

VECTOR_INDEX_MIN_ROWS = 50_000  # below this, exact (flat) search is fast (~5 ms) and exact
# The vector index is IVF-HNSW-SQ with few, large partitions, all of them probed: k-means
# partitions cut sets of near neighbours apart (at 1M rows of benchmarks/search.py, 122
# partitions of 8k rows need 20 probes for recall@10 0.98), while each probe costs a fixed
# ~0.3 ms and an HNSW graph's search cost grows only with the log of its size.
VECTOR_PARTITION_ROWS = 250_000
ANN_EF_CONSTRUCTION = 150  # HNSW build effort (LanceDB's default 300 doubles the build time)
# ANN search knobs (benchmarks/search.py: recall@10 >= 0.95 at 1M rows)
ANN_NPROBES = 16  # every partition up to 4M rows
ANN_EF = 128  # HNSW candidate list (at least k * ANN_REFINE is used)
ANN_REFINE = 4  # re-rank 4k candidates by their exact vectors (the index stores int8 codes)
_LIST_COLUMNS = ("lora_id", "name", "base_model", "trigger_words")
_RETRIES = 5


@dataclass
class SearchHit:
    """One search result."""

    lora_id: str
    name: str
    score: float
    base_model: str
    trigger_words: list[str]

    def to_dict(self) -> dict:
        return {"lora_id": self.lora_id, "name": self.name, "score": self.score,
                "base_model": self.base_model, "trigger_words": list(self.trigger_words)}


def _ann(query, k: int):
    """Apply the ANN knobs (a flat search ignores them); HNSW needs ``ef >= k * refine``."""
    return query.nprobes(ANN_NPROBES).ef(max(ANN_EF, k * ANN_REFINE)).refine_factor(ANN_REFINE)


def _quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _retry(action):
    """Run a table write, retrying commit conflicts with other writers."""
    for attempt in range(_RETRIES):
        try:
            return action()
        except (RuntimeError, OSError) as error:  # lance raises RuntimeError on commit conflicts
            if attempt == _RETRIES - 1 or "onflict" not in str(error) and "etry" not in str(error):
                raise
            time.sleep(0.05 * 2**attempt)


class Registry:
    """A folder holding a LanceDB database (``lancedb/``), a blob store (``blobs/``) and the
    registered base models (``bases/``). Open with :meth:`Registry.open`."""

    def __init__(self, root: Path, version: int | str | None = None) -> None:
        self.root = root
        self.blobs = BlobStore(root / "blobs")
        self._bases_dir = root / "bases"
        self._bases_dir.mkdir(parents=True, exist_ok=True)
        self.db = lancedb.connect(root / "lancedb", read_consistency_interval=timedelta(0))
        self.loras = self._table("loras", loras_schema(TEXT_DIM), "lora_id")
        self.files = self._table("files", FILES_SCHEMA, "sha256")
        self.rejections = self._table("rejections", REJECTIONS_SCHEMA, "rejection_id")
        self.read_only = version is not None
        self._version = version
        self._search_table = None  # the LoRA table through LanceDB's async API, for searches
        if version is not None:
            self.loras.checkout(version)

    @classmethod
    def open(cls, path: str | os.PathLike, version: int | str | None = None) -> "Registry":
        """Open (creating if needed) the registry at ``path``; ``version`` (a number or a tag)
        gives a read-only view of the LoRA table as it was then."""
        root = Path(path)
        root.mkdir(parents=True, exist_ok=True)
        return cls(root, version)

    def _table(self, name: str, schema: pa.Schema, key: str):
        try:
            table = self.db.create_table(name, schema=schema, exist_ok=True)
        except (ValueError, RuntimeError, OSError):  # created by a concurrent process meanwhile
            table = self.db.open_table(name)
        try:
            _retry(lambda: table.set_unenforced_primary_key(key))
        except ValueError as error:  # set once, when the table was created
            if "already set" not in str(error):
                raise
        return table

    # ---- base models -------------------------------------------------------------------
    def register_base(self, base: BaseModel) -> None:
        """Make LoRAs for ``base`` recognisable (persisted in ``bases/NAME.json``)."""
        target = self._bases_dir / f"{base.name.replace('/', '__')}.json"
        tmp = target.with_suffix(".tmp")
        tmp.write_text(base.to_json(), encoding="utf-8")
        os.replace(tmp, target)

    def bases(self) -> list[BaseModel]:
        """The built-in FLUX.1-dev plus every registered base model."""
        registered = [BaseModel.from_json(p.read_text(encoding="utf-8"))
                      for p in sorted(self._bases_dir.glob("*.json"))]
        return [flux1_dev(), *registered]

    # ---- writes ------------------------------------------------------------------------
    def add(self, paths: Iterable[str | os.PathLike], *, progress: bool = False, batch_size: int = 64):
        """Ingest files and folders (walked); returns an :class:`registry.ingest.IngestReport`."""
        from registry.ingest import ingest_paths  # ingest builds on this class

        if self.read_only:
            raise PermissionError("this registry view is pinned to a version; open it without one to write")
        return ingest_paths(self, paths, progress=progress, batch_size=batch_size)

    def upsert(self, table, rows: Sequence[dict], key: str, *, update: bool) -> None:
        """Batch upsert keyed by ``key``; ``update=False`` keeps the first writer's row."""
        if not rows:
            return
        data = pa.Table.from_pylist(list(rows), schema=table.schema)

        def write():
            builder = table.merge_insert(key)
            if update:
                builder = builder.when_matched_update_all()
            return builder.when_not_matched_insert_all().execute(data)

        _retry(write)

    def ensure_indexes(self) -> None:
        """BTree on the key, FTS on the text, and a vector index once the table is large."""
        names = {index.name for index in self.loras.list_indices()}
        rows = self.loras.count_rows()
        if rows == 0:
            return
        if "lora_id_idx" not in names:
            _retry(lambda: self.loras.create_index("lora_id", config=BTree()))
        if "search_text_idx" not in names:
            _retry(lambda: self.loras.create_index("search_text", config=FTS()))
        if "text_vector_idx" not in names and rows >= VECTOR_INDEX_MIN_ROWS:
            config = HnswSq(distance_type="cosine", ef_construction=ANN_EF_CONSTRUCTION,
                            num_partitions=max(1, rows // VECTOR_PARTITION_ROWS))
            _retry(lambda: self.loras.create_index("text_vector", config=config,
                                                   name="text_vector_idx"))
        elif names and self.loras.index_stats("search_text_idx").num_unindexed_rows > 1000:
            _retry(self.loras.optimize)

    # ---- versions ----------------------------------------------------------------------
    @property
    def version(self) -> int:
        return self.loras.version

    def tag(self, name: str, version: int | None = None) -> None:
        """Name a version of the LoRA table (e.g. ``prod``); moves the tag if it exists."""
        version = self.loras.version if version is None else version
        if name in self.loras.tags.list():
            self.loras.tags.update(name, version)
        else:
            self.loras.tags.create(name, version)

    def tags(self) -> dict[str, int]:
        return {name: info["version"] for name, info in self.loras.tags.list().items()}

    # ---- reads -------------------------------------------------------------------------
    def get(self, lora_id: str) -> dict | None:
        """The full row of one LoRA (without its vectors), or ``None``."""
        rows = self.loras.search().where(f"lora_id = {_quote(lora_id)}").limit(1).to_list()
        if not rows:
            return None
        row = rows[0]
        row.pop("text_vector", None)
        row["header_metadata"] = json.loads(row.get("header_metadata") or "{}")
        return row

    def lora_ids(self) -> list[str]:
        return self.loras.to_arrow().column("lora_id").to_pylist() if self.loras.count_rows() else []

    def blob_path(self, lora_id: str) -> Path:
        """The stored file of a LoRA."""
        row = self.get(lora_id)
        if row is None:
            raise KeyError(lora_id)
        return self.root / row["blob"]

    def __len__(self) -> int:
        return self.loras.count_rows()

    def search(self, prompt: str, k: int = 5, base_model: str | None = None, mode: str = "hybrid",
               encoder=None) -> list[SearchHit]:
        """Top-``k`` LoRAs for ``prompt``. ``mode``: ``hybrid`` (full text + text embedding,
        fused by LanceDB's RRF), ``text`` (full text only) or ``vector`` (embedding only)."""
        if len(self) == 0:
            return []
        if mode not in ("hybrid", "text", "vector"):
            raise ValueError(f"unknown search mode {mode!r}; use hybrid, text or vector")
        vector = None
        if mode != "text":
            from models.text_encoder import default_text_encoder

            vector = (encoder or default_text_encoder()).encode([prompt])[0]
        if mode == "vector":
            return self.search_by_vector(vector, k, base_model)
        if mode == "hybrid":
            from lancedb.rerankers import RRFReranker

            query = _ann(self.loras.search(query_type="hybrid", vector_column_name="text_vector",
                                           fts_columns="search_text"), k
                         ).vector(vector).text(prompt).rerank(RRFReranker())
            score = "_relevance_score"
        else:
            query, score = self.loras.search(prompt, query_type="fts", fts_columns="search_text"), "_score"
        return self._hits(query, k, base_model, score)

    def search_by_vector(self, vector, k: int = 5, base_model: str | None = None,
                         column: str = "text_vector") -> list[SearchHit]:
        """Top-``k`` by cosine similarity to ``vector`` in ``column`` (ANN once indexed).

        Runs as one coroutine on LanceDB's event loop: its sync API makes ~5 round trips to that
        loop per query (~2 ms of a ~7 ms search). The ANN knobs are ignored by a flat search.
        """
        query = _ann(self._searchable().query().nearest_to(vector).column(column)
                     .distance_type("cosine"), k)
        if base_model:  # a prefilter (the async API's default)
            query = query.where(f"base_model = {_quote(base_model)}")
        rows = LOOP.run(query.select([*_LIST_COLUMNS, "_distance"]).limit(k).to_list())
        return [SearchHit(r["lora_id"], r["name"], 1.0 - r["_distance"], r["base_model"],
                          r["trigger_words"] or []) for r in rows]

    def _searchable(self):
        """The LoRA table via LanceDB's async API (same consistency, same pinned version)."""
        if self._search_table is None:
            async def open_table():
                db = await lancedb.connect_async(self.root / "lancedb",
                                                 read_consistency_interval=timedelta(0))
                table = await db.open_table("loras")
                if self._version is not None:
                    await table.checkout(self._version)
                return table

            self._search_table = LOOP.run(open_table())
        return self._search_table

    def _indexed_vectors(self) -> set[str]:
        return {c for index in self.loras.list_indices() for c in index.columns
                if index.index_type.upper().startswith("IVF")}

    @staticmethod
    def _hits(query, k: int, base_model: str | None, score: str) -> list[SearchHit]:
        if base_model:
            query = query.where(f"base_model = {_quote(base_model)}", prefilter=True)
        rows = query.select(list(_LIST_COLUMNS)).limit(k).to_list()
        return [SearchHit(r["lora_id"], r["name"], (1.0 - r[score]) if score == "_distance" else r[score],
                          r["base_model"], r["trigger_words"] or []) for r in rows]
