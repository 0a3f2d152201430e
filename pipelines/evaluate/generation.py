"""Generation report: prompts that describe HELD-OUT themes in words only (no trigger), rendered by
the base alone and with the top-1/2/3 LoRAs retrieved from the registry fused by ``gated``.

Each prompt states every attribute of a scene; the theme's attributes in the theme's own words
(synonyms the base never saw, for synonym themes).  Score = read-out accuracy of the values the
prompt asks for.  Retrieval runs per prompt on the whole registry; prompts that retrieve the same
LoRAs are rendered in one batch (trigger words added as ``Generator`` does).  The share of prompts
whose top-k holds the theme's own LoRA (or one of its independently trained twins) is reported
beside the scores.  ``own1`` is the reference a perfect retriever gives: the theme's own LoRA alone
(its trigger added, fused by ``gated``) on the same prompts, so ``top1`` below ``own1`` is what
retrieval misses cost and ``own1`` below ``base`` what adding a right LoRA costs; that cost is split
by ``base_with_trigger`` (the base, the own trigger word added, no LoRA) and ``own1_without_trigger``
(the own LoRA, no trigger word).
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from models.torch_threads import one_torch_thread
from pipelines.evaluate.fusion_common import markdown_table, open_world, save_grid, scene_accuracy
from pipelines.evaluate.generation_anchor import AnchorRetrieval
from pipelines.evaluate.retrieval import manifest_ids
from pipelines.generate import Generator, with_triggers
from pipelines.world.scene import caption, sample_attributes

RETRIEVED = ("top1", "top2", "top3")
ANCHOR = ("paper_top1", "paper_top2", "paper_top3")  # the authors' retrieval (generation_anchor)
SETTINGS = ("base", *RETRIEVED, *ANCHOR, "own1", "base_with_trigger", "own1_without_trigger")
GROUPS = ("synonym", "canonical", "all")
LEGEND = (
    "**Columns.** Read-out accuracy of the attribute values each prompt asks for. `base`: the base alone "
    "(the baseline); `top1`/`top2`/`top3`: the k LoRAs hybrid search retrieves for the prompt, their trigger "
    "words added, fused by `gated` (ours, as `autolora generate` runs); `paper_top1`/`2`/`3` (the anchor): the k "
    "LoRAs the authors' weight-only encoder design retrieves (trained on our encoder's pool, as in the retrieval "
    "report; every LoRA of the base ranked by weight-embedding cosine with the prompt), their triggers added, "
    "fused by `gated` with the authors' gates (their released initialisation trained by eq. 10 alone, as in the "
    "fusion report's `gated_paper`) when the report has them, else with ours (see the gates line above); "
    "references: `own1` (the theme's own "
    "LoRA with its trigger: a perfect retriever), `base_with_trigger` (the base, that trigger word added, no "
    "LoRA), `own1_without_trigger` (the own LoRA, no trigger word). **Rows.** `synonym`: themes described in "
    "words the base never saw; `canonical`: in the base's own words; `all`: both. Held-out themes only.",
)


def word_prompts(entry: Mapping, n: int, seed: int) -> tuple[list[str], list[dict[str, str]]]:
    """``n`` prompts describing scenes of the theme with its words, no trigger; the scenes."""
    rng = np.random.default_rng([seed, 0x6E4])
    words = dict(zip(entry["attrs"], entry["words"]))
    scenes = [sample_attributes(rng, entry["attrs"]) for _ in range(n)]
    return [caption(s, rng, words=words) for s in scenes], scenes


def _render_retrieved(gen: Generator, prompts: list[str], k: int, seed: int, retrieve=None, gates=None,
                      ) -> tuple[np.ndarray, list[list], list[str]]:
    """The renders with each prompt's top-k (by ``retrieve``, else ours) fused (by ``gates``, else the
    generator's), the hits, and the texts rendered (triggers added)."""
    hits = [(retrieve or gen.retrieve)(p, k) for p in prompts]
    texts = [with_triggers(p, [w for x in h for w in x.trigger_words]) for p, h in zip(prompts, hits)]
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, h in enumerate(hits):
        groups[tuple(x.lora_id for x in h)].append(i)
    images = np.empty((len(prompts), 32, 32, 3), np.uint8)
    for ids, rows in groups.items():
        images[rows] = gen.render([texts[i] for i in rows], list(ids), seed, "gated", gates)
    return images, hits, texts


def clip_cut(pipe, texts: Sequence[str]) -> list[bool]:
    """Whether each text is longer than the base's CLIP tokenizer takes: the CLIP (pooled) side then
    reads only its start (T5 reads it whole)."""
    tokenizer = pipe.tokenizer
    return [len(ids) > tokenizer.model_max_length for ids in tokenizer(list(texts), verbose=False)["input_ids"]]


def evaluate_generation(registry, world_root: str | Path, out: str | Path, *, gates=None, gates_paper=None,
                        n_prompts: int = 8, seed: int = 0, progress: bool = True, pipe=None) -> dict:
    """Run the report; writes ``generation.json``, ``generation.md`` and a grid; returns the JSON.
    ``gates_paper``: the anchor rows' gates (the authors' recipe); None: ours, so those rows then
    differ from ours by the retrieval alone."""
    from pipelines.world.sampling import generate

    world = open_world(world_root, pipe)
    scores: dict[str, dict[str, list[float]]] = {g: {s: [] for s in SETTINGS} for g in GROUPS}
    found: dict[str, list[float]] = {s: [] for s in (*RETRIEVED, *ANCHOR)}
    cut: dict[str, list[bool]] = {s: [] for s in SETTINGS}
    grid_rows: dict[str, dict[str, np.ndarray]] = {}
    out = Path(out)
    ids = manifest_ids(registry, world.root, world.heldout)
    family_ids = defaultdict(set)  # a theme's own LoRA and its independently trained twins
    for entry in world.heldout:
        family_ids[entry["family"]].add(ids[entry["file"]])
    active = next((r for r in registry.encoder_versions() if r.active), None)
    anchor = AnchorRetrieval(registry, active, progress) if active is not None else None  # no encoder: no anchor
    with one_torch_thread(), Generator(registry, world.pipe, gates, method="gated") as gen:
        for index, entry in enumerate(tqdm(world.heldout, desc="generation", disable=not progress)):
            prompts, scenes = word_prompts(entry, n_prompts, seed + index)
            render_seed = seed + 1000 + index
            images = {"base": generate(world.pipe, prompts, render_seed)}
            texts = {"base": prompts, "own1_without_trigger": prompts}
            own = family_ids[entry["family"]]
            for k in (1, 2, 3):
                for name, retrieve, fuse in ((f"top{k}", None, None),
                                             (f"paper_top{k}", anchor and anchor.retrieve, gates_paper)):
                    if name.startswith("paper") and anchor is None:
                        continue
                    images[name], hits, texts[name] = _render_retrieved(gen, prompts, k, render_seed, retrieve, fuse)
                    found[name] += [float(any(h.lora_id in own for h in hh)) for hh in hits]
            own_id = ids[entry["file"]]
            triggers = list(registry.get(own_id)["trigger_words"])
            triggered = texts["own1"] = texts["base_with_trigger"] = [with_triggers(p, triggers) for p in prompts]
            for setting, rendered in texts.items():
                cut[setting] += clip_cut(world.pipe, rendered)
            images["own1"] = gen.render(triggered, [own_id], render_seed, "gated")
            images["base_with_trigger"] = generate(world.pipe, triggered, render_seed)
            images["own1_without_trigger"] = gen.render(prompts, [own_id], render_seed, "gated")
            group = "synonym" if entry["synonym"] else "canonical"
            for setting, imgs in images.items():
                acc = scene_accuracy(world.readout.predict(imgs), scenes)
                scores[group][setting].append(acc)
                scores["all"][setting].append(acc)
            if group not in grid_rows:
                grid_rows[group] = {f"{s}": imgs for s, imgs in images.items()}
                grid_rows[group]["prompts"] = prompts  # type: ignore[assignment]
    report = {g: {s: float(np.mean(v)) if v else None for s, v in by.items()} for g, by in scores.items()}
    report["retrieval_found"] = {s: float(np.mean(v)) if v else None for s, v in found.items()}
    report["clip_cut"] = {s: float(np.mean(v)) if v else None for s, v in cut.items()}
    report["anchor_encoder"] = anchor.encoder if anchor else None
    report["anchor_gates"] = getattr(gates_paper, "version", None) if anchor else None  # None: ours
    out.mkdir(parents=True, exist_ok=True)
    (out / "generation.json").write_text(json.dumps(report, indent=1))
    (out / "generation.md").write_text(_markdown(report, grid_rows, out, world.root, gates, n_prompts))
    return report


def _markdown(report: Mapping, grid_rows: Mapping, out: Path, root: Path, gates, n_prompts: int) -> str:
    lines = ["# Generation with retrieved LoRAs (held-out themes, words only)", "",
             f"World `{root}`; {n_prompts} prompts per held-out theme; fusion `gated`, gates "
             f"`{getattr(gates, 'version', 'untrained')}`"
             + (f"; the anchor's (`paper_top*`): `{report['anchor_gates']}`" if report.get("anchor_gates") else "")
             + ".", "",
             markdown_table(["prompts", *SETTINGS], [(g, *(report[g][s] for s in SETTINGS)) for g in GROUPS]), "",
             "Share of prompts whose top-k holds the theme's own LoRA (or a twin): "
             + ", ".join(f"{s} {v:.3f}" for s, v in report["retrieval_found"].items() if v is not None)
             + " (the query is the whole prompt, a scene of several attributes, searched on the hybrid channel "
               "over the whole registry, or by the authors' encoder for `paper_top*`: harder than the retrieval "
               "report's one-attribute queries). Authors' encoder: "
             + (f"`{report['anchor_encoder']['version']}`" if report.get("anchor_encoder") else
                "none (the registry has no active encoder, so no anchor rows)") + ".", "",
             "Share of rendered prompts longer than the base's CLIP tokenizer takes (the CLIP side reads only "
             "their start; T5 reads them whole; the trigger words added make them longer): "
             + ", ".join(f"{s} {v:.3f}" for s, v in report["clip_cut"].items() if v is not None) + ".", "",
             *LEGEND, ""]
    for group, rows in grid_rows.items():
        prompts: Sequence[str] = rows["prompts"]
        path = save_grid(out / f"generation_{group}.png", {s: rows[s] for s in SETTINGS if s in rows})
        lines += [f"## {group} theme, first prompts", "", f"Rows: {', '.join(SETTINGS)}. Prompts: "
                  f"{'; '.join(prompts[:3])}; ...", "", f"![{group}]({path.name})", ""]
    return "\n".join(lines)
