"""Fusion of a search's ranked lists by their scores: each list z-normalised, positive parts summed.

Written here because LanceDB's rerankers fuse by rank (``RRFReranker``, ``MRRReranker``) or by a
fixed linear weight of two lists (``LinearCombinationReranker``); none weighs a list by how far its
own top stands out. That matters here: a scene prompt ("a crimson disc on a striped background,
glow style") names four attributes, so the weight embedding's list is a flat ranking of LoRAs that
each fix one of them, while the card text's list ranks the theme's LoRA far above the rest; on a
LoRA with no usable card the text lists are the flat ones. Rank fusion counts a flat list's first
place as much as a confident list's, so in the demo world's generation prompts it put the
synonym theme's LoRA first for 0.18 of prompts where the text lists alone did for 0.97.

For each list, every row of the union of the lists gets the list's score (full text: BM25;
vectors: minus the distance); a row a list did not return gets 0 from a full-text list that
returned fewer rows than it was asked for (it matched no query term), else the list's lowest score
(it ranked below the list's last). Standardised over the union (z = (x - mean) / std, as
OpenSearch's ``z_score`` hybrid normalisation), a list adds only its positive part: evidence for
the rows it places above its own average. The fused score is the sum divided by the sum of each
list's best z, so 1.0 means "first in every list" (where no list prefers any row, e.g. a single
row, every row ties first), and it does not depend on ``k`` (each list is fetched to a fixed depth).
Rows with equal scores (those below every list's average score 0) are ordered by their whole z sum,
negative parts included, so a single list's rows keep its order all the way down.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from lancedb.rerankers import Reranker

_SCORES = ("_score", "_distance")


def _raw(table: pa.Table) -> tuple[np.ndarray, bool]:
    """A list's scores, higher = better, and whether it is a full-text list."""
    if "_score" in table.column_names:
        return table["_score"].to_numpy(zero_copy_only=False).astype(np.float64), True
    return -table["_distance"].to_numpy(zero_copy_only=False).astype(np.float64), False


class ZScoreReranker(Reranker):
    """Fuses lists with ``_rowid`` and ``_score`` (full text) or ``_distance`` (vector) columns;
    ``depth``: the number of rows each list was asked for."""

    def __init__(self, depth: int) -> None:
        super().__init__(return_score="relevance")
        self.depth = depth

    def rerank_hybrid(self, query: str, vector_results: pa.Table, fts_results: pa.Table) -> pa.Table:
        return self.rerank_multivector([vector_results, fts_results], query, deduplicate=True)

    def rerank_multivector(self, vector_results: list[pa.Table], query: str | None = None,
                           deduplicate: bool = True) -> pa.Table:
        """One row per ``_rowid`` (the first list's columns, without scores) with
        ``_relevance_score``, best first; ``deduplicate`` is implied."""
        lists = [t for t in vector_results if len(t)]
        if not lists:
            return vector_results[0].drop_columns([c for c in _SCORES if c in vector_results[0].column_names])
        ids, first = np.unique(np.concatenate([t["_rowid"].to_numpy() for t in lists]), return_index=True)
        total, whole, best = np.zeros(len(ids)), np.zeros(len(ids)), 0.0
        for table in lists:
            raw, full_text = _raw(table)
            fill = 0.0 if full_text and len(table) < self.depth else raw.min()
            x = np.full(len(ids), fill)
            x[np.searchsorted(ids, table["_rowid"].to_numpy())] = raw
            spread = x.std()
            if spread <= 1e-12 * max(1.0, abs(x.mean())):
                continue  # every row scored alike: no evidence either way
            z = (x - x.mean()) / spread
            whole += z
            z = np.maximum(z, 0.0)
            total += z
            best += z.max()
        rows = pa.concat_tables([t.drop_columns([c for c in _SCORES if c in t.column_names]) for t in lists],
                                promote_options="default").take(pa.array(first))
        scores = total / best if best > 0 else np.ones(len(ids))  # no list prefers a row: all tie first
        order = np.lexsort((-whole, -scores))  # by score, ties by the whole z sum
        return rows.take(pa.array(order)).append_column("_relevance_score", pa.array(scores[order], pa.float32()))
