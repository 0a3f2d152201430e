"""Search over the LoRA table by channel, the lists fused by their z-normalised scores.

Three ranked lists exist: full text (BM25 over names, trigger words, render prompts, captions,
tags), the text embedding of that metadata, and the **weight embedding** (the LoRA-weight encoder's
vector, made from the LoRA's weights alone; only vectors of the base model's active encoder version
are searched, so a query never ranks two encoders' vectors together; the query is embedded by the
same frozen text encoder for every channel, except for an encoder trained against another one, whose
list gets its own query vector: :mod:`registry.store.weight_query`). Channels: ``weights`` is the
weight list alone (score: cosine similarity, 1 = same direction; from the index's int8 codes once
the table is indexed, so within ~0.01 of the exact value); ``text`` fuses the two text lists;
``hybrid`` fuses all three (the weight list only where an encoder is active). A fused score
(:mod:`registry.store.fusion`) sums what each list says of a row in standard deviations above the
list's own average, over the sum of the lists' best: 1.0 means "ranked first by every list", and a
flat list (a scene prompt's weight list, a card-less LoRA's text lists) weighs less than one whose
top stands out. Each list always contributes its top ``max(k, HYBRID_DEPTH)``, so a hit's score does
not depend on ``k`` (for ``k <= HYBRID_DEPTH``).

Every query runs as one coroutine on LanceDB's public async API, on an event loop of our own
(:class:`_Loop`). A process's first search opens the table and loads its vector and full-text
indexes whole into LanceDB's index cache (one sequential read each, sized by
:data:`INDEX_CACHE_BYTES`), and what a hit shows into memory (:class:`_Listing`), while the
query is being embedded: later queries never wait on disk, whatever the OS page cache holds.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

import lancedb
import numpy as np
import pyarrow as pa

from registry.store.fusion import ZScoreReranker
from registry.store.store import Store, quote, where_in
from registry.store.weight_query import text_encoder_of

# Below this, exact (flat) search: it reads every vector per query, ~1 ms per 1,000 rows (20k
# rows: p50 21 ms flat vs 2.9 ms indexed, recall@10 0.986, index built in 4.6 s).
VECTOR_INDEX_MIN_ROWS = 10_000
# The vector index is IVF-HNSW-SQ with few, large partitions, all of them probed: k-means
# partitions cut sets of near neighbours apart (at 1M rows of benchmarks/search.py, 122
# partitions of 8k rows need 20 probes for recall@10 0.98), while each probe costs a fixed
# ~0.3 ms and an HNSW graph's search cost grows only with the log of its size.
VECTOR_PARTITION_ROWS = 250_000
ANN_EF_CONSTRUCTION = 150  # HNSW build effort (LanceDB's default 300 doubles the build time)
ANN_NPROBES = 16  # every partition up to 4M rows
# HNSW candidate list: rows / ANN_ROWS_PER_EF within [ANN_EF, ANN_EF_MAX] (and at least the
# limit). Without re-ranking, recall is set by ef and grows harder with the table: at 1M rows of
# benchmarks/search.py (cold page cache, load ~3.5 on 2 cores) ef 128/256/512/768/1024 gave
# recall@10 0.834/0.907/0.955/0.960/0.964 at p50 6.4/9.8/7.9/8.7/9.0 ms, p99 11/20/31/29/15 ms;
# at 200k rows ef 128 already gave 0.974 (and 256 no more).
ANN_EF = 128
ANN_EF_MAX = 1024
ANN_ROWS_PER_EF = 1_000
# No re-ranking by the stored float vectors (refine_factor): that reads the data files at
# random, i.e. from disk once the OS has dropped them from its page cache (measured at 1M rows
# with a cold cache: p50 17-119 ms, p99 0.2-1.2 s). The index's int8 codes rank well enough.
ANN_REFINE: int | None = None
HYBRID_DEPTH = 50  # each channel's top list, fused by their z-normalised scores (registry.store.fusion)
MAX_POSTFILTERED = 1_000  # removed rows hidden by over-fetching (see Searcher._plan)
LISTING_RELOAD_S = 10.0  # at most this often, a changed table's listing is read again (_Listing)
# LanceDB's caches, one per process (shared by every registry opened in it). The index cache
# must hold the whole vector index (~0.6 GB at 1M rows) plus the full-text and scalar indexes.
INDEX_CACHE_BYTES = 3 << 30
METADATA_CACHE_BYTES = 256 << 20
CHANNELS = ("hybrid", "weights", "text")
_LIST_COLUMNS = ["lora_id", "name", "base_model", "trigger_words"]
_WARM_COLUMNS = ("text_vector", "weight_vector", "search_text")  # indexes loaded whole when a table is opened


class NoWeightEncoder(LookupError):
    """The weight channel was asked for, but no LoRA-weight encoder is active in the registry."""


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
    def submit(cls, coroutine) -> concurrent.futures.Future:
        with cls._lock:
            if cls._loop is None:
                cls._loop = asyncio.new_event_loop()
                threading.Thread(target=cls._loop.run_forever, name="autolora-lancedb",
                                 daemon=True).start()
        return asyncio.run_coroutine_threadsafe(coroutine, cls._loop)

    @classmethod
    def run(cls, coroutine):
        return cls.submit(coroutine).result()


_session: lancedb.Session | None = None


def _get_session() -> lancedb.Session:
    """The process's LanceDB session (its index and metadata caches)."""
    global _session
    if _session is None:
        _session = lancedb.Session(index_cache_size_bytes=INDEX_CACHE_BYTES,
                                   metadata_cache_size_bytes=METADATA_CACHE_BYTES)
    return _session


NOT_REMOVED = "(removed IS NULL OR removed = false)"  # = removed IS NOT TRUE; uses an index on it


def _filter(base_model: str | None, where: str | None) -> str | None:
    parts = [f"base_model = {quote(base_model)}"] if base_model else []
    if where:
        parts.append(f"({where})")
    return " AND ".join(parts) or None


@dataclass(frozen=True)
class _Plan:
    """How a query filters: ``where`` as a prefilter, or (hiding removed rows only) as a
    postfilter over ``extra`` more rows than asked for, which leaves exactly as many."""

    where: str | None = None
    postfilter: bool = False
    extra: int = 0

    def apply(self, query, limit: int):
        if self.where:
            query = query.where(self.where)  # a prefilter (the async API's default) ...
            if self.postfilter:
                query = query.postfilter()
        return query.limit(limit + self.extra)


def _ann(query, limit: int, rows: int):
    """Apply the ANN knobs (a flat search ignores them); HNSW needs ``ef >= limit``."""
    ef = max(min(ANN_EF_MAX, rows // ANN_ROWS_PER_EF), ANN_EF, limit * (ANN_REFINE or 1))
    query = query.distance_type("cosine").nprobes(ANN_NPROBES).ef(ef)
    return query.refine_factor(ANN_REFINE) if ANN_REFINE else query


def _check(channel: str, k: int) -> None:
    if channel not in CHANNELS and channel != "vector":  # "vector": search_by_vector's own
        raise ValueError(f"unknown search channel {channel!r}; use one of {', '.join(CHANNELS)}")
    if k < 1:
        raise ValueError(f"k must be at least 1 (got {k})")


class Searcher:
    """Searches one :class:`Store` (its pinned version, if any)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._opening: concurrent.futures.Future | None = None
        self._counts: tuple[int, int, int] | None = None  # table version, rows, rows removed
        self._listing: _Listing | None = None
        self._listing_started = 0.0
        self._reloading: asyncio.Future | None = None
        # encoder-table version, active encoders (version, text encoder spec, checkpoint file)
        self._active: tuple[int, list[_Active]] | None = None

    def warm(self, wait: bool = False) -> None:
        """Open the table and load its indexes into memory, in the background unless ``wait``
        (the first search does this itself; call it early to overlap it with other work)."""
        if self._opening is None:
            self._opening = _Loop.submit(self._open())
        if wait:
            self._opening.result()

    async def _open(self):
        """The LoRA table on the async API (same consistency and pinned version as the store),
        its vector and full-text indexes loaded into the index cache, its listing into memory;
        and the encoder table (pinned alike), to know each base model's active encoder."""
        store = self.store
        db = await lancedb.connect_async(store.root / "lancedb", read_consistency_interval=timedelta(0),
                                         session=_get_session())
        table, encoders = await asyncio.gather(db.open_table("loras"), db.open_table("encoders"))
        if store.pinned is not None:
            await asyncio.gather(table.checkout(store.pinned), encoders.checkout(store.encoders.version))
        names = [i.name for i in await table.list_indices() if set(i.columns) & set(_WARM_COLUMNS)]
        await asyncio.gather(self._load_listing(table), *(table.prewarm_index(name) for name in names))
        return table, encoders

    async def _active_versions(self, encoders) -> list[_Active]:
        """The active encoders (one per base model), kept per encoder-table version."""
        version = await encoders.version()
        if self._active is None or self._active[0] != version:
            rows = (await encoders.query().where("active = true").select(["version", "info", "file", "base_model"])
                    .to_arrow()).to_pylist()
            active = [_Active(r["version"], text_encoder_of(r["info"]), str(self.store.root / r["file"]),
                              r["base_model"]) for r in rows]
            self._active = (version, sorted(active))
        return self._active[1]

    async def _load_listing(self, table) -> None:
        self._listing_started = time.monotonic()
        listing = await _Listing.load(table)
        if listing is not None and (self._listing is None or listing.version > self._listing.version):
            self._listing = listing

    async def _plan(self, table, base_model: str | None, where: str | None,
                    include_removed: bool) -> tuple[_Plan, int, _Listing | None]:
        """How to filter, the table's row count (both kept per table version) and the listing
        if it is of this version (else a newer one is loaded in the background, at most every
        LISTING_RELOAD_S). Removed rows are hidden by a postfilter where they are few and
        nothing else filters: a prefilter builds a mask of every row (~40 ms at 1M rows)."""
        version = await table.version()
        if self._counts is None or self._counts[0] != version:
            self._counts = (version, await table.count_rows(), await table.count_rows("removed = true"))
        _, rows, removed = self._counts
        listing = self._listing if self._listing is not None and self._listing.version == version else None
        if listing is None and (self._reloading is None or self._reloading.done()) and (
                time.monotonic() - self._listing_started >= LISTING_RELOAD_S):
            self._reloading = asyncio.ensure_future(self._load_listing(table))
        user = _filter(base_model, where)
        if include_removed or not removed:
            return _Plan(user), rows, listing
        if user is None and removed <= MAX_POSTFILTERED:
            return _Plan(NOT_REMOVED, postfilter=True, extra=removed), rows, listing
        return _Plan(" AND ".join(filter(None, [NOT_REMOVED, user]))), rows, listing

    def search(self, prompt: str, k: int = 5, base_model: str | None = None, channel: str = "hybrid",
               encoder=None, where: str | None = None, include_removed: bool = False) -> list[SearchHit]:
        """Top-``k`` LoRAs for ``prompt``; see :meth:`registry.Registry.search`.

        The query coroutine starts first: opening the table (first search), the filter plan and
        the full-text leg run on the event loop while this thread embeds the prompt."""
        _check(channel, k)
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"empty prompt {prompt!r}: give the words to search for")
        self.warm()
        embedded: concurrent.futures.Future = concurrent.futures.Future()
        job = _Loop.submit(self._search(prompt, embedded, k, channel, base_model, where, include_removed))
        try:
            from models.text_encoder import default_text_encoder

            embedded.set_result((encoder or default_text_encoder()).encode([prompt])[0])
        except BaseException as error:
            embedded.set_exception(error)
            job.cancel()
            raise
        return job.result()

    async def _search(self, prompt: str, embedded: concurrent.futures.Future, k: int, channel: str,
                      base_model: str | None, where: str | None, include_removed: bool,
                      column: str = "text_vector") -> list[SearchHit]:
        table, encoders = await asyncio.wrap_future(self._opening)
        plan, rows, listing = await self._plan(table, base_model, where, include_removed)
        active = await self._active_versions(encoders) if channel in ("hybrid", "weights") else []
        active = [a for a in active if base_model in (None, a.base_model)]  # the others' rows are filtered out
        if channel == "weights" and not active:
            raise NoWeightEncoder(f"{self.store.root}: no LoRA-weight encoder is active in this registry"
                                  f"{f' for {base_model}' if base_model else ''} (train one: `autolora train "
                                  "encoder`), so there is no weight channel")
        if rows == 0:  # (an empty table has no full-text index)
            return []
        query = _Query(table, prompt, embedded, k, channel, plan, rows, column, active)
        hits = await query.ranked(listing)
        if hits is None:  # a hit the listing lacks: the table changed meanwhile
            hits = await query.ranked(None)
        return hits

    def by_vector(self, vector, k: int = 5, base_model: str | None = None, column: str = "text_vector",
                  where: str | None = None, include_removed: bool = False) -> list[SearchHit]:
        """Top-``k`` by cosine similarity to ``vector`` in ``column`` (ANN once indexed)."""
        _check("vector", k)
        self.warm()
        embedded: concurrent.futures.Future = concurrent.futures.Future()
        embedded.set_result(vector)
        return _Loop.run(self._search("", embedded, k, "vector", base_model, where, include_removed, column))


@dataclass(frozen=True, order=True)
class _Active:
    """An active encoder version, the text encoder it was trained against ("" the default), its
    checkpoint and its base model."""

    version: str
    text_encoder: str
    checkpoint: str
    base_model: str


@dataclass
class _Query:
    """One search's ranked lists (legs) and their fusion."""

    table: object
    prompt: str
    embedded: concurrent.futures.Future
    k: int
    channel: str  # a channel, or "vector": one vector column alone (``by_vector``)
    plan: _Plan
    rows: int
    column: str
    active: list[_Active]  # active encoders (the weight legs search only their vectors)

    async def ranked(self, listing: _Listing | None) -> list[SearchHit] | None:
        """The top ``k``, listed from ``listing`` (None if it lacks a hit) or, without one, from
        the columns the queries read along."""
        columns = [] if listing else _LIST_COLUMNS
        fused = self.channel in ("hybrid", "text")
        depth = max(self.k, HYBRID_DEPTH) if fused else self.k
        legs = []
        if fused:  # the full-text leg runs while the prompt is still being embedded
            text = self.table.query().nearest_to_text(self.prompt, columns="search_text")
            legs.append(asyncio.ensure_future(self._run(text.select([*columns, "_score"]), depth, self.plan)))
        vector = await asyncio.wrap_future(self.embedded)
        if self.channel in ("text", "hybrid", "vector"):
            legs.append(self._nearest(vector, self.column, depth, columns, self.plan))
        if self.channel in ("weights", "hybrid") and self.active:
            for versions, weight_query in await self._weight_queries(vector):
                weight_filter = where_in("encoder_version", versions)
                where = " AND ".join(f"({w})" for w in (self.plan.where, weight_filter) if w)
                legs.append(self._nearest(weight_query, "weight_vector", depth, columns, _Plan(where)))
        found = await asyncio.gather(*legs)
        if not fused:  # one list, or weight lists of encoders with their own query vectors
            best = found[0] if len(found) == 1 else pa.concat_tables(found).sort_by("_distance").slice(0, depth)
            return _list(best, [1.0 - d for d in best["_distance"].to_pylist()], listing)
        if not any(len(leg) for leg in found):
            return []
        result = ZScoreReranker(depth).rerank_multivector(found, self.prompt).slice(0, self.k)
        return _list(result, result["_relevance_score"].to_pylist(), listing)

    async def _weight_queries(self, vector) -> list[tuple[list[str], object]]:
        """(versions, query vector) per weight list: one list for the encoders trained against
        the default text encoder (the vector every channel shares), one for each other encoder
        (the prompt through its own text encoder and text map, embedded in a worker thread)."""
        shared = [a.version for a in self.active if not a.text_encoder]
        own = [a for a in self.active if a.text_encoder]
        from registry.store.weight_query import query_vectors

        vectors = await asyncio.gather(*(asyncio.to_thread(query_vectors, a.text_encoder, a.checkpoint, [self.prompt])
                                         for a in own))
        return ([(shared, vector)] if shared else []) + [([a.version], v[0]) for a, v in zip(own, vectors)]

    async def _run(self, query, depth: int, plan: _Plan) -> pa.Table:
        return (await plan.apply(query.with_row_id(), depth).to_arrow()).slice(0, depth)

    def _nearest(self, vector, column: str, depth: int, columns: list[str], plan: _Plan):
        query = _ann(self.table.query().nearest_to(vector).column(column), depth + plan.extra, self.rows)
        return self._run(query.select([*columns, "_distance"]), depth, plan)


def _list(found: pa.Table, scores: list[float], listing: _Listing | None) -> list[SearchHit] | None:
    """Hits for the rows of ``found`` (with ``_rowid``) and their scores."""
    if listing is not None:
        return listing.hits(found["_rowid"].to_numpy(), scores)
    return [SearchHit(r["lora_id"], r["name"], score, r["base_model"], r["trigger_words"] or [])
            for r, score in zip(found.select(_LIST_COLUMNS).to_pylist(), scores)]


@dataclass
class _Listing:
    """What a hit shows (``_LIST_COLUMNS``) of every row of one table version, in memory and
    sorted by row id (~50 MB at 1M rows). Reading those columns for each hit from the data files
    took ~4 of a 10 ms query at 1M rows, and random reads go to disk once the OS has dropped the
    files' pages. A row id is only looked up in the listing of the version the query read."""

    version: int
    row_ids: np.ndarray
    rows: pa.Table

    @classmethod
    async def load(cls, table) -> _Listing | None:
        """The listing of the table's current version (None if a commit raced the scan)."""
        version = await table.version()
        data = await table.query().select(_LIST_COLUMNS).with_row_id().to_arrow()
        if await table.version() != version:
            return None
        ids = data["_rowid"].to_numpy()
        order = np.argsort(ids, kind="stable")
        return cls(version, ids[order], data.select(_LIST_COLUMNS).take(order))

    def hits(self, row_ids: np.ndarray, scores: list[float]) -> list[SearchHit] | None:
        at = np.minimum(np.searchsorted(self.row_ids, row_ids), max(len(self.row_ids) - 1, 0))
        if len(row_ids) and (not len(self.row_ids) or not np.array_equal(self.row_ids[at], row_ids)):
            return None
        return [SearchHit(r["lora_id"], r["name"], score, r["base_model"], r["trigger_words"] or [])
                for r, score in zip(self.rows.take(at).to_pylist(), scores)]
