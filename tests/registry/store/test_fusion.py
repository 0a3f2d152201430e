"""Score fusion of search lists: a list weighs by how far its top stands out, not by rank alone."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from lancedb.rerankers import RRFReranker

from registry.store.fusion import ZScoreReranker

DEPTH = 50


def vector_list(row_ids, distances) -> pa.Table:
    return pa.table({"_rowid": pa.array(row_ids, pa.uint64()), "lora_id": [f"lora-{i}" for i in row_ids],
                     "_distance": pa.array(distances, pa.float32())})


def text_list(row_ids, scores) -> pa.Table:
    return pa.table({"_rowid": pa.array(row_ids, pa.uint64()), "lora_id": [f"lora-{i}" for i in row_ids],
                     "_score": pa.array(scores, pa.float32())})


def confident_and_flat():
    """List 1 puts row 0 far above the rest; list 2 is a flat ranking (noise) led by row 1, row 0 10th."""
    rng = np.random.default_rng(0)
    ids = list(range(DEPTH))
    confident = vector_list(ids, [0.1, *np.sort(rng.uniform(0.55, 0.7, DEPTH - 1))])
    others = rng.permutation([i for i in ids if i not in (0, 1)]).tolist()
    flat = vector_list([1, *others[:8], 0, *others[8:]], np.sort(rng.normal(0.5, 0.01, DEPTH)))
    return confident, flat


def test_a_confident_list_outweighs_a_flat_one_where_rank_fusion_does_not() -> None:
    confident, flat = confident_and_flat()
    ours = ZScoreReranker(DEPTH).rerank_multivector([confident, flat])
    rrf = RRFReranker().rerank_multivector([confident.drop_columns(["_distance"]),
                                            flat.drop_columns(["_distance"])], None, deduplicate=True)
    assert rrf["_rowid"][0].as_py() == 1  # second in one list and first in the other
    assert ours["_rowid"][0].as_py() == 0
    assert len(set(ours["_rowid"].to_pylist())) == len(ours) == DEPTH  # one row per LoRA
    scores = ours["_relevance_score"].to_numpy()
    assert np.all(np.diff(scores) <= 0) and 0 < scores[0] < 1 and "_distance" not in ours.column_names


def test_first_in_every_list_scores_one_and_order_of_lists_does_not_matter() -> None:
    a = vector_list([3, 1, 2], [0.1, 0.5, 0.6])
    b = text_list([3, 2], [9.0, 1.0])
    one = ZScoreReranker(DEPTH).rerank_multivector([a, b])
    other = ZScoreReranker(DEPTH).rerank_multivector([b, a])
    assert one["_rowid"][0].as_py() == 3 and one["_relevance_score"][0].as_py() == pytest.approx(1.0)
    assert dict(zip(one["_rowid"].to_pylist(), one["_relevance_score"].to_pylist())) == pytest.approx(
        dict(zip(other["_rowid"].to_pylist(), other["_relevance_score"].to_pylist())))
    assert one.column_names == ["_rowid", "lora_id", "_relevance_score"]


def test_a_row_a_short_full_text_list_did_not_return_matched_no_term() -> None:
    """A full-text list shorter than asked holds every matching row: the others score 0 there, so a
    lone match is strong evidence. A list cut at the depth says nothing of the rows it left out:
    they rank below its last, level with it, not at 0."""
    vectors = vector_list(list(range(20)), np.linspace(0.30, 0.34, 20))  # nearly flat, row 0 first
    lone_match = text_list([7], [1.5])
    ranked = ZScoreReranker(DEPTH).rerank_multivector([vectors, lone_match])
    assert ranked["_rowid"][0].as_py() == 7
    level = vector_list(list(range(20)), [0.3] * 20)  # no evidence: skipped
    cut = text_list([7, *range(8, 8 + DEPTH - 1)], [1.5, *[1.4] * (DEPTH - 1)])  # truncated at the depth
    ranked_cut = ZScoreReranker(DEPTH).rerank_multivector([level, cut])
    score = dict(zip(ranked_cut["_rowid"].to_pylist(), ranked_cut["_relevance_score"].to_pylist()))
    assert ranked_cut["_rowid"][0].as_py() == 7 and score[3] == score[9]  # row 3 left out, row 9 at the last score


def test_a_single_row_and_empty_lists() -> None:
    single = ZScoreReranker(DEPTH).rerank_multivector([vector_list([4], [0.2]), text_list([], [])])
    assert single["_rowid"].to_pylist() == [4] and single["_relevance_score"][0].as_py() == 1.0
    empty = ZScoreReranker(DEPTH).rerank_multivector([vector_list([], []), text_list([], [])])
    assert len(empty) == 0


def test_a_single_list_keeps_its_order_below_its_average_too() -> None:
    """Rows below a list's average all score 0; they are ordered by how far below it they are (they
    tied, in row id order, before): hybrid over LoRAs with no text is the weight channel's ranking."""
    rng = np.random.default_rng(3)
    ids = rng.permutation(DEPTH).tolist()
    ranked = vector_list(ids, np.sort(rng.uniform(0.2, 0.9, DEPTH)))
    fused = ZScoreReranker(DEPTH).rerank_multivector([ranked])
    assert fused["_rowid"].to_pylist() == ids
    scores = fused["_relevance_score"].to_numpy()
    assert scores[0] == pytest.approx(1.0) and (scores == 0).sum() > DEPTH // 3
