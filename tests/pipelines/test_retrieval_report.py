"""The retrieval report's markdown and heatmaps from a made-up evaluation (no models)."""

from __future__ import annotations

import numpy as np

from pipelines.evaluate.retrieval_report import _blocks, tick_label, write_report

SCORES = {"recall_at_1": 0.5, "recall_at_3": 0.75, "recall_at_10": 1.0, "mrr": 0.6}


def made_up_report() -> dict:
    prov = {"world": {"root": "/w/micro-seed0", "key": "abc123", "seed": 0},
            "registry": {"root": "/r/registry", "version": 7}, "text_encoder": "all-MiniLM-L6-v2 (bundled)",
            "encoder": {"version": "enc-ours-1", "pool_size": 6, "where": ""}, "heldout_in_encoder_pool": 0,
            "date": "2026-01-01T00:00:00+00:00",
            "paper_design": {"version": "enc-paper-2", "pool_size": 6, "trained": False, "seconds": 0.0}}
    rows = {name: dict(SCORES) for name in ("weights", "text", "hybrid", "weight_stats", "render_read", "random",
                                            "canonical_oracle")}
    return {"queries": 6, "pool": 4, "encoder": "enc-ours-1", "provenance": prov, **rows,
            "paper_design": dict(SCORES, within_theme_cos=0.123, cross_theme_cos=0.045),
            "stripped": {c: dict(SCORES) for c in ("weights", "text", "hybrid")},
            "whole_registry": {"weights": dict(SCORES), "text": dict(SCORES), "hybrid": dict(SCORES), "pool": 10},
            "within_theme_cos": 0.5, "cross_theme_cos": 0.1}


def test_family_blocks_and_tick_labels():
    assert _blocks(["a", "a", "b", "c", "c", "c"]) == [(0, 2), (2, 3), (3, 6)]
    assert tick_label("red-square", "red-square") == "red-square"
    assert tick_label("jade-pyramid", "jade-trigon-by-kai") == "jade-pyramid / jade-trigon-by-kai"


def test_the_markdown_names_provenance_roles_and_both_designs(tmp_path):
    rng = np.random.default_rng(0)
    families = ["a", "a", "b", "c"]
    figures = {"weights": (rng.normal(size=(4, 8)), families), "paper_design": (rng.normal(size=(4, 8)), families)}
    paths = write_report(tmp_path, made_up_report(), figures, ["a", "a-by-x", "b", "c"])
    assert [p.rsplit("/", 1)[-1] for p in paths] == ["heatmap-weights.png", "heatmap-paper_design.png"]
    assert all((tmp_path / f"heatmap-{name}.png").stat().st_size > 10_000 for name in ("weights", "paper_design"))
    markdown = (tmp_path / "retrieval.md").read_text()
    for text in ("## Provenance", "`/w/micro-seed0` (key `abc123`, seed 0)", "`/r/registry`, version 7",
                 "all-MiniLM-L6-v2 (bundled)", "`enc-ours-1`, trained on 6 LoRAs",
                 "`enc-paper-2`, trained on the same 6 LoRAs (reused from the registry)", "retrieval.json",
                 "| paper_design | anchor |", "| canonical_oracle | reference |", "| random | baseline |",
                 "**Caveat:**", "training LoRAs count as hits here (not zero-shot)",
                 "| weights (ours) | 0.500 | 0.100 | 0.400 |", "| paper_design (authors' design) | 0.123 | 0.045 |",
                 "![heatmap-weights](heatmap-weights.png)"):
        assert text in markdown, text
