"""The retrieval evaluation's markdown report (provenance, legend, tables) and its cosine heatmaps
(matplotlib, PNG)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

ROWS = ("weights", "text", "hybrid", "paper_design", "weight_stats", "render_read", "random", "canonical_oracle")
METRICS = ("recall_at_1", "recall_at_3", "recall_at_10", "mrr")

# row -> (role, what it is); the stripped rows are ours on a copy without metadata
ROLES = {
    "weights": ("ours", "search by the LoRA's weights alone: our weight encoder's embedding against the query's "
                        "text embedding"),
    "text": ("ours", "search by the LoRA's texts: file name, trigger words, card, render prompts, captions"),
    "hybrid": ("ours", "the weight and text channels combined (what `autolora search` does by default)"),
    "stripped": ("ours, no metadata", "the same three channels on a copy of the held-out LoRAs with hashed file "
                                      "names, no sidecars and no header metadata: the weights alone"),
    "paper_design": ("anchor", "the authors' AutoLoRA encoder design (learned probes, causal mask, mean pool, fixed "
                               "temperature, every layer required) trained on the same pool with the same recipe"),
    "weight_stats": ("baseline", "no learning: fixed random probes of every layer; a LoRA is given the mean text "
                                 "embedding of its 5 nearest training LoRAs"),
    "render_read": ("baseline", "no learning: each LoRA renders neutral prompts, the world's read-out reads the "
                                "renders, and the majority attribute values, in words, are embedded"),
    "random": ("baseline", "random rankings (mean of 200 seeded shuffles)"),
    "canonical_oracle": ("reference", "not a method: each held-out LoRA embedded as its theme's query in canonical "
                                      "words, i.e. what a perfect reader of the weights would reach with this text "
                                      "encoder"),
}
DEFINITIONS = [
    "- **Recall@k** (`recall_at_k`): the share of queries with at least one relevant LoRA in the top k.",
    "- **MRR@10** (`mrr`): the mean over queries of 1 / rank of the first relevant LoRA, 0 when none is in "
    "the top 10.",
    "- **Relevant**: a LoRA is relevant to a query when its theme fixes the attribute value(s) the query asks for "
    "(\"crimson colour\", \"a disc\", \"crimson disc\"), so independently trained LoRAs of one theme, and any other "
    "theme fixing that value, all count. Synonym themes are asked in their synonyms (words no training theme uses).",
    "- **Held-out LoRAs only**: the pool is the world's held-out LoRAs, never seen by the encoder in training "
    "(zero-shot), except in the whole-registry section below.",
]
CAVEAT = ("**Caveat:** the text-bearing channels (`text`, `hybrid`) see the theme's words in the held-out LoRAs' "
          "file names, trigger words and cards (the LoRA for \"jade pyramid\" is `jade-pyramid`), which is why they "
          "reach about 1.0. The `stripped` rows are the no-metadata setting: compare the weight encoder there.")


def tick_label(family: str, theme: str) -> str:
    """``family / theme``, or the theme alone when it is its family's own."""
    return theme if theme == family else f"{family} / {theme}"


def _blocks(families: Sequence[str]) -> list[tuple[int, int]]:
    """``(start, end)`` of each run of one family in an ordered list."""
    runs: list[tuple[int, int]] = []
    for i, family in enumerate(families):
        if runs and families[runs[-1][0]] == family:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


def heatmap(path: Path, embeddings: np.ndarray, families: Sequence[str], labels: Sequence[str], title: str) -> Path:
    """Cosine similarity of the embeddings, rows and columns grouped by theme family (as the paper's
    Fig. 4): each family's block outlined, ticks ``family / theme``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    order = sorted(range(len(families)), key=lambda i: (families[i], labels[i]))
    e = embeddings[order] / np.maximum(np.linalg.norm(embeddings[order], axis=1, keepdims=True), 1e-12)
    fam = [families[i] for i in order]
    names = [tick_label(families[i], labels[i]) for i in order]
    n = len(names)
    side = min(max(5.0, 3.0 + 0.25 * n), 14.0)
    fontsize = 8 if n <= 16 else 6
    fig, ax = plt.subplots(figsize=(side + 1.5, side))
    image = ax.imshow(e @ e.T, vmin=-1, vmax=1, cmap="RdBu_r")
    for start, end in _blocks(fam):
        if start:
            for line in (ax.axhline, ax.axvline):
                line(start - 0.5, color="0.6", linewidth=0.4)
        ax.add_patch(Rectangle((start - 0.5, start - 0.5), end - start, end - start, fill=False,
                               edgecolor="black", linewidth=2.0 if end - start > 1 else 0.8))
    ax.set_xticks(range(n), names, rotation=90, fontsize=fontsize)
    ax.set_yticks(range(n), names, fontsize=fontsize)
    ax.set_xlabel("held-out LoRA (family / theme; outlined: one family)")
    ax.set_ylabel("held-out LoRA (family / theme)")
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, fraction=0.046, label="cosine")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def figure_title(name: str, report: Mapping) -> str:
    """The heatmap title of the embeddings ``name`` (``weights``: ours, ``paper_design``: the authors')."""
    prov = report.get("provenance", {})
    if name == "paper_design":
        role = f"authors' design, {prov.get('paper_design', {}).get('version', '?')}"
    elif name == "weights":
        role = f"ours, {report.get('encoder', '?')}"
    else:
        role = name
    return f"Weight embeddings ({role})\nof {report['pool']} held-out LoRAs: cosine, grouped by theme family"


def _row(name: str, scores: Mapping[str, float]) -> str:
    return f"| {name} | " + " | ".join(f"{scores[m]:.3f}" for m in METRICS) + " |"


def provenance_lines(report: Mapping) -> list[str]:
    """The markdown provenance block: world, registry, text encoder, both encoders, date."""
    prov = report.get("provenance")
    if not prov:
        return []
    world, reg, ours = prov["world"], prov["registry"], prov["encoder"]
    lines = ["## Provenance", "",
             f"- world: `{world['root']}` (key `{world.get('key') or '?'}`, seed {world.get('seed')})",
             f"- registry: `{reg['root']}`, version {reg['version']}",
             f"- text encoder: {prov['text_encoder']}",
             f"- our encoder: `{ours['version']}`, trained on {ours['pool_size']} LoRAs"]
    paper = prov.get("paper_design")
    if paper:
        how = f"trained for this report in {paper['seconds']:.0f} s" if paper["trained"] else "reused from the registry"
        same = "the same" if paper["pool_size"] == ours["pool_size"] else "**a different** pool of"
        lines.append(f"- authors' design: `{paper['version']}`, trained on {same} {paper['pool_size']} LoRAs ({how})")
    if prov.get("heldout_in_encoder_pool"):
        lines.append(f"- **warning:** {prov['heldout_in_encoder_pool']} held-out LoRA(s) were in our encoder's "
                     "training pool: not zero-shot")
    lines += [f"- date (UTC): {prov['date']}", "- JSON: `retrieval.json` beside this file (what "
              "`autolora eval retrieval --json` prints)", ""]
    return lines


def legend_lines(report: Mapping) -> list[str]:
    """The legend: each row's role, the metrics and the relevance rule."""
    lines = ["## Legend", "", "| row | role | what it is |", "|---|---|---|"]
    for name in (*ROWS[:3], "stripped", *ROWS[3:]):
        if name in report:
            shown = "stripped weights / text / hybrid" if name == "stripped" else name
            lines.append(f"| {shown} | {ROLES[name][0]} | {ROLES[name][1]} |")
    return [*lines, "", *DEFINITIONS, "", CAVEAT, ""]


def cosine_lines(report: Mapping) -> list[str]:
    """Within- and across-family cosine of ours and, when run, the authors' design."""
    rows = [("weights (ours)", report["within_theme_cos"], report["cross_theme_cos"])]
    if "paper_design" in report:
        paper = report["paper_design"]
        rows.append(("paper_design (authors' design)", paper["within_theme_cos"], paper["cross_theme_cos"]))
    lines = ["## Embedding geometry", "",
             "Mean cosine between different LoRAs of the same theme family (independently trained LoRAs of one "
             "theme) vs between LoRAs of different families; a good encoder puts the first well above the second.",
             "", "| embeddings | same family | different families | gap |", "|---|---|---|---|"]
    return lines + [f"| {name} | {w:.3f} | {c:.3f} | {w - c:.3f} |" for name, w, c in rows] + [""]


def write_report(out: Path, report: Mapping, figures: Mapping[str, tuple[np.ndarray, Sequence[str]]],
                 labels: Sequence[str]) -> list[str]:
    """``retrieval.md`` + one heatmap per embedding in ``figures`` (``labels``: the LoRAs' themes);
    returns the figure paths."""
    paths = [str(heatmap(out / f"heatmap-{name}.png", emb, fam, labels, figure_title(name, report)))
             for name, (emb, fam) in figures.items()]
    header = "| row | " + " | ".join(METRICS) + " |\n|---|" + "---|" * len(METRICS)
    lines = [f"# Retrieval evaluation (encoder {report['encoder']})", "",
             f"{report['queries']} queries over the held-out pool of {report['pool']} LoRAs (zero-shot: held-out "
             "LoRAs only, never seen by the encoder).", "",
             *provenance_lines(report), *legend_lines(report), "## Results", "", header]
    lines += [_row(name, report[name]) for name in ROWS if name in report]
    lines += [_row(f"stripped {c}", scores) for c, scores in report["stripped"].items()]
    kinds = report.get("by_query_kind", {})
    if kinds:
        lines += ["", "By query kind (synonym queries use words no training theme uses; `canonical_oracle` "
                  "embeds each LoRA as its theme's query in canonical words):", "",
                  "| row | kind | queries | " + " | ".join(METRICS) + " |", "|---|---|---|" + "---|" * len(METRICS)]
        lines += [f"| {row} | {kind} | {s['queries']} | " + " | ".join(f"{s[m]:.3f}" for m in METRICS) + " |"
                  for row, by_kind in kinds.items() for kind, s in by_kind.items()]
    whole = report["whole_registry"]
    lines += ["", f"## Over the whole registry ({whole['pool']} LoRAs)", "",
              f"Held-out queries over all {whole['pool']} LoRAs of the registry; training LoRAs count as hits here "
              "(not zero-shot).", "", header]
    lines += [_row(c, scores) for c, scores in whole.items() if c != "pool"]
    lines += ["", *cosine_lines(report), *[f"![{Path(p).stem}]({Path(p).name})" for p in paths], ""]
    (out / "retrieval.md").write_text("\n".join(lines), encoding="utf-8")
    return paths
