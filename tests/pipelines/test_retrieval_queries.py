"""Queries of the retrieval evaluation: their kind (synonym or canonical), metrics by kind, and the
canonical-word reference row."""

from __future__ import annotations

from models.text_encoder import default_text_encoder
from pipelines.evaluate.retrieval import canonical_oracle_rankings
from pipelines.evaluate.retrieval_queries import canonical_text, make_queries, metrics, metrics_by_kind

ENTRIES = [
    {"attrs": {"colour": "red"}, "words": ["red"], "synonym": False},
    {"attrs": {"shape": "star"}, "words": ["star"], "synonym": False},
    {"attrs": {"background": "striped"}, "words": ["striped"], "synonym": False},
    {"attrs": {"colour": "green", "shape": "triangle"}, "words": ["jade", "pyramid"], "synonym": True},
]
ATTRS = {f"l{i}": e["attrs"] for i, e in enumerate(ENTRIES)}


def test_queries_carry_the_kind_of_the_words_they_are_written_in():
    queries = {q.text: q for q in make_queries(ENTRIES)}
    assert {t for t, q in queries.items() if q.synonym} == {"jade colour", "a pyramid", "jade pyramid"}
    assert not queries["red colour"].synonym and queries["red colour"].wants == (("colour", "red"),)
    assert queries["jade pyramid"].wants == (("colour", "green"), ("shape", "triangle"))


def test_metrics_by_kind_split_the_queries():
    queries = make_queries(ENTRIES)
    # every query gets the perfect LoRA first, except the synonym ones, which get a wrong one
    right = {q.text: next(i for i, a in ATTRS.items() if q.relevant(a)) for q in queries}
    rankings = [["l1" if q.synonym else right[q.text]] for q in queries]
    kinds = metrics_by_kind(rankings, queries, ATTRS)
    assert kinds["canonical"]["recall_at_1"] == 1.0 and kinds["canonical"]["queries"] == 3
    assert kinds["synonym"]["recall_at_10"] == 0.0 and kinds["synonym"]["queries"] == 3
    assert metrics(rankings, queries, ATTRS)["recall_at_1"] == 3 / 6


def test_the_canonical_oracle_embeds_a_lora_as_its_values_in_canonical_words():
    assert canonical_text(ENTRIES[3]["attrs"]) == "green triangle"  # not its synonyms "jade pyramid"
    queries = make_queries(ENTRIES)
    rankings = canonical_oracle_rankings(list(ATTRS), ENTRIES, queries, default_text_encoder().encode)
    kinds = metrics_by_kind(rankings, queries, ATTRS)
    assert kinds["canonical"]["recall_at_1"] == 1.0  # canonical queries: the exact theme first

def test_a_lora_from_outside_the_world_is_relevant_to_no_query():
    """The whole-registry ranking may hold LoRAs the world's manifest does not know (a user's own)."""
    queries = make_queries(ENTRIES)
    right = {q.text: next(i for i, a in ATTRS.items() if q.relevant(a)) for q in queries}
    rankings = [["lora-not-in-the-world", right[q.text]] for q in queries]
    scores = metrics(rankings, queries, ATTRS)
    assert scores["recall_at_1"] == 0.0 and scores["recall_at_3"] == 1.0 and scores["mrr"] == 0.5
