"""Search over the LoRA table: full text, text embedding, and both fused by LanceDB's RRF.

Scores: ``text`` is the BM25 score; ``vector`` the cosine similarity (1 = same direction);
``hybrid`` the reciprocal-rank-fusion score divided by its maximum, so 1.0 means "ranked first
by every channel" and the value does not grow with ``k``.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
from datetime import timedelta

import lancedb
from lancedb.index import FTS, BTree, HnswSq  # noqa: F401 - re-exported for maintenance

from registry.store.store import Store, quote

# The vector index is IVF-HNSW-SQ with few, large partitions, all of them probed: k-means
# partitions cut sets of near neighbours apart (at 1M rows of benchmarks/search.py, 122
# partitions of 8k rows need 20 probes for recall@10 0.98), while each probe costs a fixed
# ~0.3 ms and an HNSW graph's search cost grows only with the log of its size.
VECTOR_INDEX_MIN_ROWS = 50_000  # below this, exact (flat) search is fast (~5 ms) and exact
VECTOR_PARTITION_ROWS = 250_000
ANN_EF_CONSTRUCTION = 150  # HNSW build effort (LanceDB's default 300 doubles the build time)
ANN_NPROBES = 16  # every partition up to 4M rows
ANN_EF = 128  # HNSW candidate list (at least k * ANN_REFINE is used)
ANN_REFINE = 4  # re-rank 4k candidates by their exact vectors (the index stores int8 codes)
RRF_K = 60  # LanceDB's RRFReranker default
MODES = ("hybrid", "text", "vector")
_LIST_COLUMNS = ["lora_id", "name", "base_model", "trigger_words"]


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


class _Loop:
    """One event loop on a daemon thread for LanceDB's (public) async API: a whole query is one
    coroutine, one hand-off, where the sync API makes ~5 round trips to its own loop."""

    _loop: asyncio.AbstractEventLoop | None = None
    _lock = threading.Lock()

    @classmethod
    def run(cls, coroutine):
        with cls._lock:
            if cls._loop is None:
                cls._loop = asyncio.new_event_loop()
                threading.Thread(target=cls._loop.run_forever, name="autolora-lancedb",
                                 daemon=True).start()
        return asyncio.run_coroutine_threadsafe(coroutine, cls._loop).result()


def _filter(base_model: str | None, where: str | None, include_removed: bool) -> str | None:
    parts = [] if include_removed else ["removed IS NOT TRUE"]
    if base_model:
        parts.append(f"base_model = {quote(base_model)}")
    if where:
        parts.append(f"({where})")
    return " AND ".join(parts) or None


def _ann(query, k: int):
    """Apply the ANN knobs (a flat search ignores them); HNSW needs ``ef >= k * refine``."""
    return query.nprobes(ANN_NPROBES).ef(max(ANN_EF, k * ANN_REFINE)).refine_factor(ANN_REFINE)


class Searcher:
    """Searches one :class:`Store` (its pinned version, if any)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._async_table = None

    def _table(self):
        """The LoRA table through LanceDB's async API (same consistency, same pinned version)."""
        if self._async_table is None:
            store = self.store

            async def open_table():
                db = await lancedb.connect_async(store.root / "lancedb",
                                                 read_consistency_interval=timedelta(0))
                table = await db.open_table("loras")
                if store.pinned is not None:
                    await table.checkout(store.pinned)
                return table

            self._async_table = _Loop.run(open_table())
        return self._async_table

    def search(self, prompt: str, k: int = 5, base_model: str | None = None, mode: str = "hybrid",
               encoder=None, where: str | None = None, include_removed: bool = False) -> list[SearchHit]:
        """Top-``k`` LoRAs for ``prompt``; see :meth:`registry.Registry.search`."""
        if mode not in MODES:
            raise ValueError(f"unknown search mode {mode!r}; use one of {', '.join(MODES)}")
        if k < 1:
            raise ValueError(f"k must be at least 1 (got {k})")
        if len(self.store) == 0:
            return []
        vector = None
        if mode != "text":
            from models.text_encoder import default_text_encoder

            vector = (encoder or default_text_encoder()).encode([prompt])[0]
        if mode == "vector":
            return self.by_vector(vector, k, base_model, where=where, include_removed=include_removed)
        table = self.store.loras
        if mode == "hybrid":
            from lancedb.rerankers import RRFReranker

            query = _ann(table.search(query_type="hybrid", vector_column_name="text_vector",
                                      fts_columns="search_text"), k
                         ).vector(vector).text(prompt).rerank(RRFReranker(K=RRF_K))
            score, scale = "_relevance_score", (RRF_K + 1) / 2  # two channels, each at best 1/(K+1)
        else:
            query = table.search(prompt, query_type="fts", fts_columns="search_text")
            score, scale = "_score", 1.0
        condition = _filter(base_model, where, include_removed)
        if condition:
            query = query.where(condition, prefilter=True)
        rows = query.select(_LIST_COLUMNS).limit(k).to_list()
        return [SearchHit(r["lora_id"], r["name"], float(r[score]) * scale, r["base_model"],
                          r["trigger_words"] or []) for r in rows]

    def by_vector(self, vector, k: int = 5, base_model: str | None = None, column: str = "text_vector",
                  where: str | None = None, include_removed: bool = False) -> list[SearchHit]:
        """Top-``k`` by cosine similarity to ``vector`` in ``column`` (ANN once indexed), as one
        coroutine on the async API. The ANN knobs are ignored by a flat search."""
        if k < 1:
            raise ValueError(f"k must be at least 1 (got {k})")
        query = _ann(self._table().query().nearest_to(vector).column(column).distance_type("cosine"), k)
        condition = _filter(base_model, where, include_removed)
        if condition:  # a prefilter (the async API's default)
            query = query.where(condition)
        rows = _Loop.run(query.select([*_LIST_COLUMNS, "_distance"]).limit(k).to_list())
        return [SearchHit(r["lora_id"], r["name"], 1.0 - r["_distance"], r["base_model"],
                          r["trigger_words"] or []) for r in rows]
