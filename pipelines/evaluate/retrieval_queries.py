"""Queries and ground truth of the retrieval evaluation, and its metrics.

Queries are written from the attribute values that held-out themes fix, in the theme's own words
(synonyms for the synonym themes): one per value ("crimson colour", "a disc", "hatched style")
and one per two-value theme in its words ("crimson disc"); a query in a synonym theme's words is a
*synonym* query, the rest *canonical* ones. A LoRA is relevant to a query when its
theme fixes every value the query asks for, so independently trained LoRAs of one theme (and any
other theme fixing that value) are all relevant. Recall@k is the share of queries with at least
one relevant LoRA in the top k; MRR is the mean reciprocal rank of the first relevant one within
the top 10 (0 beyond).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

FORMS = {"shape": "a {w}", "colour": "{w} colour", "background": "{w} background", "style": "{w} style"}
KS = (1, 3, 10)
DEPTH = 10


@dataclass(frozen=True)
class Query:
    """A prompt and the attribute values it asks for."""

    text: str
    wants: tuple[tuple[str, str], ...]
    synonym: bool = False  # written in a synonym theme's words (which no training theme uses)

    def relevant(self, attrs: Mapping[str, str]) -> bool:
        return all(attrs.get(a) == v for a, v in self.wants)


def make_queries(entries: Sequence[Mapping]) -> list[Query]:
    """Every query the held-out manifest ``entries`` give (deduplicated by text)."""
    queries: dict[str, Query] = {}
    for entry in entries:
        pairs = list(zip(entry["attrs"].items(), entry["words"], strict=True))
        for (attr, value), word in pairs:
            text = FORMS[attr].format(w=word)
            queries.setdefault(text, Query(text, ((attr, value),), bool(entry["synonym"])))
        if len(pairs) > 1:
            text = " ".join(word for _, word in pairs)
            queries.setdefault(text, Query(text, tuple(entry["attrs"].items()), bool(entry["synonym"])))
    return list(queries.values())


def metrics(rankings: Sequence[Sequence[str]], queries: Sequence[Query],
            attrs_of: Mapping[str, Mapping[str, str]]) -> dict[str, float]:
    """Recall@1/3/10 and MRR@10 of ranked LoRA ids, one ranking per query; a LoRA without
    ``attrs_of`` (one from outside the world, in a whole-registry ranking) is relevant to none."""
    first = []
    for ranking, query in zip(rankings, queries, strict=True):
        hit = next((i for i, lora in enumerate(ranking[:DEPTH], 1) if query.relevant(attrs_of.get(lora, {}))), None)
        first.append(hit)
    out = {f"recall_at_{k}": float(np.mean([h is not None and h <= k for h in first])) for k in KS}
    out["mrr"] = float(np.mean([1.0 / h if h else 0.0 for h in first]))
    return out


def metrics_by_kind(rankings: Sequence[Sequence[str]], queries: Sequence[Query],
                    attrs_of: Mapping[str, Mapping[str, str]]) -> dict[str, dict[str, float]]:
    """:func:`metrics` over the synonym queries and over the canonical ones separately."""
    out = {}
    for kind, flag in (("synonym", True), ("canonical", False)):
        picked = [i for i, q in enumerate(queries) if q.synonym == flag]
        if picked:
            out[kind] = dict(metrics([rankings[i] for i in picked], [queries[i] for i in picked], attrs_of),
                             queries=len(picked))
    return out


def canonical_text(attrs: Mapping[str, str]) -> str:
    """The query a theme fixing ``attrs`` gets in canonical words ("green triangle")."""
    return " ".join(attrs.values())


def rank_by_cosine(lora_ids: Sequence[str], embeddings: np.ndarray, query_vectors: np.ndarray) -> list[list[str]]:
    """Each query's LoRA ids by descending cosine similarity of the (normalised) embeddings."""
    e = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
    q = query_vectors / np.maximum(np.linalg.norm(query_vectors, axis=1, keepdims=True), 1e-12)
    order = np.argsort(-(q @ e.T), axis=1, kind="stable")
    return [[lora_ids[j] for j in row[:DEPTH]] for row in order]


def random_metrics(lora_ids: Sequence[str], queries: Sequence[Query], attrs_of: Mapping[str, Mapping[str, str]],
                   draws: int = 200, seed: int = 0) -> dict[str, float]:
    """The metrics of random rankings (mean over ``draws`` seeded shuffles)."""
    rng = np.random.default_rng(seed)
    runs = [metrics([list(rng.permutation(lora_ids)) for _ in queries], queries, attrs_of) for _ in range(draws)]
    return {key: float(np.mean([r[key] for r in runs])) for key in runs[0]}


def theme_cosines(embeddings: np.ndarray, families: Sequence[str]) -> tuple[float, float]:
    """Mean cosine between distinct LoRAs of one family, and between LoRAs of different ones."""
    e = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
    sim = e @ e.T
    fam = np.asarray(families)
    same = fam[:, None] == fam[None, :]
    off = ~np.eye(len(fam), dtype=bool)
    within = sim[same & off]
    return float(within.mean()) if within.size else float("nan"), float(sim[~same].mean())
