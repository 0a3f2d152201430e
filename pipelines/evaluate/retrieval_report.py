"""The retrieval evaluation's markdown report and figures (matplotlib, PNG)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

ROWS = ("weights", "text", "hybrid", "paper_design", "weight_stats", "render_read", "random", "canonical_oracle")
METRICS = ("recall_at_1", "recall_at_3", "recall_at_10", "mrr")


def heatmap(path: Path, embeddings: np.ndarray, families: Sequence[str], labels: Sequence[str], title: str) -> Path:
    """Cosine similarity of the embeddings, rows grouped by theme family (as the paper's Fig. 4)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = sorted(range(len(families)), key=lambda i: (families[i], labels[i]))
    e = embeddings[order] / np.maximum(np.linalg.norm(embeddings[order], axis=1, keepdims=True), 1e-12)
    fig, ax = plt.subplots(figsize=(9, 8))
    image = ax.imshow(e @ e.T, vmin=-1, vmax=1, cmap="RdBu_r")
    names = [labels[i] for i in order]
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
    ax.set_yticks(range(len(names)), names, fontsize=6)
    ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _row(name: str, scores: Mapping[str, float]) -> str:
    return f"| {name} | " + " | ".join(f"{scores[m]:.3f}" for m in METRICS) + " |"


def write_report(out: Path, report: Mapping, figures: Mapping[str, tuple[np.ndarray, Sequence[str]]],
                 labels: Sequence[str]) -> list[str]:
    """``retrieval.md`` + one heatmap per embedding in ``figures``; returns the figure paths."""
    paths = [str(heatmap(out / f"heatmap-{name}.png", emb, fam, labels, f"{name}: cosine, grouped by theme"))
             for name, (emb, fam) in figures.items()]
    header = "| row | " + " | ".join(METRICS) + " |\n|---|" + "---|" * len(METRICS)
    lines = [f"# Retrieval evaluation (encoder {report['encoder']})", "",
             f"{report['queries']} queries over the held-out pool of {report['pool']} LoRAs (zero-shot).", "",
             header]
    lines += [_row(name, report[name]) for name in ROWS if name in report]
    lines += [_row(f"stripped {c}", scores) for c, scores in report["stripped"].items()]
    kinds = report.get("by_query_kind", {})
    if kinds:
        lines += ["", "By query kind (synonym queries use words no training theme uses; `canonical_oracle` "
                  "embeds each LoRA as its theme's query in canonical words):", "",
                  "| row | kind | queries | " + " | ".join(METRICS) + " |", "|---|---|---|" + "---|" * len(METRICS)]
        lines += [f"| {row} | {kind} | {s['queries']} | " + " | ".join(f"{s[m]:.3f}" for m in METRICS) + " |"
                  for row, by_kind in kinds.items() for kind, s in by_kind.items()]
    lines += ["", f"Over the whole registry ({report['whole_registry']['pool']} LoRAs):", "", header]
    lines += [_row(c, scores) for c, scores in report["whole_registry"].items() if c != "pool"]
    lines += ["", f"Weight embeddings: mean cosine within a theme {report['within_theme_cos']:.3f}, "
              f"across themes {report['cross_theme_cos']:.3f} (independently trained LoRAs of a theme count as one).",
              "", *[f"![{Path(p).stem}]({Path(p).name})" for p in paths], ""]
    (out / "retrieval.md").write_text("\n".join(lines), encoding="utf-8")
    return paths
