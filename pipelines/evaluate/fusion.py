"""Fusion report on HELD-OUT LoRAs: every method side by side, with ``base`` and ``single`` rows.

Sets of k = 2 and 3 held-out LoRAs whose themes fix *different* attributes (half of the pairs an
object theme with a style theme, the rest random disjoint sets).  A set's prompts carry every
trigger and a scene that leaves all the themes' attributes unsaid and states the others.  Per
method (same prompts and seeds):

* concept accuracy: for each concept, the share of its theme's attributes the read-out finds in
  the renders; ``kN_accuracy`` is the mean over concepts and sets, ``kN_worst`` the mean over sets
  of the set's worst concept;
* ``prompt_accuracy``: read-out accuracy of the attributes the prompt states outright;
* ``loss_ratio``: each concept's flow-matching loss on fresh images of its theme with the whole
  set active, divided by the loss with its own LoRA alone (mean over concepts and sets).

``base`` renders without LoRA; ``single`` renders each concept with its own LoRA alone (diffusers,
weight 1) on the same prompts, which scores that concept (its ``prompt_accuracy`` pools the
renders of all concepts); ``single_own_trigger`` does the same with only the concept's own trigger
in front of the scene: the other triggers, words the base and this LoRA never saw, cost a LoRA
alone accuracy too, so the two rows tell the prompt's share of the interference from the weights'.
Methods that need gates get ``gates`` (``gates_noglobal`` for the ablation if given, else the same
gates). ``gated_paper`` (the anchor) is ``gated`` with ``gates_paper``: gates trained the authors' way
(``pipelines.train_gates.AUTHORS_RECIPE``); the row is left out when none are given.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from models.torch_threads import one_torch_thread
from pipelines.evaluate.fusion_common import (
    HeldoutLoss, attr_accuracy, markdown_table, open_world, save_grid, scene_accuracy,
)
from pipelines.fusion_methods import get
from pipelines.world.scene import caption, sample_attributes

METHODS = ("linear", "ties", "dare", "klora", "gated_noglobal", "gated_paper", "gated")
ROW_METHOD = {"base": "none", "gated_paper": "gated"}  # rows that run another method than their name
KEYS = ("k2_accuracy", "k3_accuracy", "k2_worst", "k3_worst", "prompt_accuracy", "loss_ratio")
LEGEND = (
    "**Rows.** `gated`: fine-grained gated fusion with the global LoRA (the AutoLoRA paper's §4 layer) with this "
    "project's gates: initialised to plain addition, trained on images showing the whole set (what `autolora "
    "generate` uses); `gated_noglobal`: the same without the global LoRA (ablation); `gated_paper` (the anchor): "
    "the same layer with gates trained the authors' way, from their released initialisation (w_x, w_l, w_c, b "
    "drawn from N(0, 1), w_o = 1) by eq. 10 alone (each target LoRA's own image-caption pairs, with "
    "interference LoRAs and the global LoRA active). Baselines: `linear` (every LoRA added at weight 1, "
    "diffusers' multi-adapter default), `ties`, `dare` (peft's merges), `klora`. References: `base` (no LoRA), "
    "`single` (each concept's own LoRA alone, same prompts), `single_own_trigger` (the same with only its own "
    "trigger word).",
    "",
    "**Columns.** `kN_accuracy`: for each fused concept, the share of its theme's attributes the read-out finds "
    "in the renders, averaged over concepts and sets of N LoRAs; `kN_worst`: the set's worst concept, averaged "
    "over sets; `prompt_accuracy`: read-out accuracy of the attributes the prompt states outright; "
    "`loss_ratio`: a concept's flow-matching loss on fresh images of its theme with the row's LoRAs active, "
    "over the loss with its own LoRA alone (1 = no interference; `base`'s is the loss with no LoRA at all). "
    "Held-out LoRAs only: neither the gates nor anything else was trained on them.",
)


def _disjoint(entries: Sequence[Mapping]) -> bool:
    keys = [set(e["attrs"]) for e in entries]
    return all(not (a & b) for a, b in itertools.combinations(keys, 2))


def concept_sets(heldout: Sequence[Mapping], k: int, n_sets: int, seed: int) -> list[list[Mapping]]:
    """``n_sets`` distinct sets of ``k`` held-out entries with pairwise-disjoint theme attributes."""
    rng = np.random.default_rng([seed, k, 0xF05E])
    combos = [list(c) for c in itertools.combinations(heldout, k) if _disjoint(c)]
    seen, unique = set(), []
    for c in combos:  # one set per combination of theme identities (re-uploads share one)
        ident = frozenset(frozenset(e["attrs"].items()) for e in c)
        if ident not in seen:
            seen.add(ident)
            unique.append(c)
    order = [unique[i] for i in rng.permutation(len(unique))]
    if k == 2:  # half object + style pairs first
        obj_style = [c for c in order if {"shape"} <= set(c[0]["attrs"]) | set(c[1]["attrs"])
                     and any(set(e["attrs"]) == {"style"} or "style" in e["attrs"] for e in c)]
        rest = [c for c in order if c not in obj_style]
        order = obj_style[: n_sets // 2] + rest
    return order[:n_sets]


def set_prompts(entries: Sequence[Mapping], n: int, seed: int, triggers_of: Sequence[Mapping] | None = None,
                ) -> tuple[list[str], list[dict[str, str]]]:
    """Prompts with every trigger and a scene omitting the themes' attributes; the stated attributes.
    ``triggers_of``: only these entries' triggers in front (the scenes stay those of ``entries``)."""
    rng = np.random.default_rng([seed, 0x5E7])
    fixed = {a: v for e in entries for a, v in e["attrs"].items()}
    triggers = ", ".join(e["trigger"] for e in (entries if triggers_of is None else triggers_of))
    prompts, stated = [], []
    for _ in range(n):
        scene = sample_attributes(rng, fixed)
        prompts.append(f"{triggers}, {caption(scene, rng, omit=fixed)}")
        stated.append({a: v for a, v in scene.items() if a not in fixed})
    return prompts, stated


def _score(world, images: np.ndarray, entries: Sequence[Mapping], stated) -> tuple[list[float], float]:
    preds = world.readout.predict(images)
    return [attr_accuracy(preds, e["attrs"]) for e in entries], scene_accuracy(preds, stated)


def _mean(values: Sequence[float]) -> float | None:
    """Mean ignoring nan; None when nothing was measured (e.g. no k=3 set in a tiny world)."""
    values = [v for v in values if v == v]
    return float(np.mean(values)) if values else None


def _aggregate(rows: Mapping[str, dict]) -> dict[str, dict[str, float | None]]:
    out = {}
    for name, r in rows.items():
        out[name] = {f"k{k}_accuracy": _mean([a for s in r[k] for a in s["acc"]]) for k in (2, 3)}
        out[name].update({f"k{k}_worst": _mean([min(s["acc"]) for s in r[k]]) for k in (2, 3)})
        out[name]["prompt_accuracy"] = _mean([s["prompt"] for k in (2, 3) for s in r[k]])
        out[name]["loss_ratio"] = _mean([x for k in (2, 3) for s in r[k] for x in s["ratio"]])
    return out


def evaluate_fusion(world_root: str | Path, out: str | Path, *, gates=None, gates_noglobal=None, gates_paper=None,
                    n_sets: int = 12, n_prompts: int = 8, n_loss: int = 16, seed: int = 0,
                    methods: Sequence[str] | None = None, progress: bool = True, pipe=None) -> dict:
    """Run the report; writes ``fusion.json``, ``fusion.md`` and grids under ``out``; returns the JSON."""
    world = open_world(world_root, pipe)
    methods = [m for m in methods or METHODS if m != "gated_paper" or gates_paper is not None]
    gate_for = {"gated": gates, "gated_noglobal": gates_noglobal if gates_noglobal is not None else gates,
                "gated_paper": gates_paper}
    names = ["base", "single", "single_own_trigger", *methods]
    rows: dict[str, dict] = {n: {2: [], 3: []} for n in names}
    loras, losses, grids = {}, {}, {}
    out = Path(out)
    with one_torch_thread():
        for k in (2, 3):
            sets = concept_sets(world.heldout, k, n_sets, seed)
            for index, entries in enumerate(tqdm(sets, desc=f"fusion k={k}", disable=not progress)):
                prompt_seed = seed + 100 * k + index
                prompts, stated = set_prompts(entries, n_prompts, prompt_seed)
                for e in entries:
                    if e["theme"] not in loras:
                        loras[e["theme"]] = world.lora(e)
                        # fresh images: LoRA i trained on seed + i, and held-out i >= train count > 7
                        losses[e["theme"]] = HeldoutLoss(world.pipe, e, n_loss, seed + 7)
                lo = [loras[e["theme"]] for e in entries]
                render_seed = seed + 1000 * k + index
                grid = {}
                single_loss, single_acc, single_images, own_acc, own_images = [], [], [], [], []
                for i, e in enumerate(entries):
                    with get("linear").apply(world.pipe, [lo[i]]):
                        single_images.append(_render(world, prompts, render_seed))
                        single_loss.append(losses[e["theme"]]())
                        own_prompts = set_prompts(entries, n_prompts, prompt_seed, triggers_of=[e])[0]
                        own_images.append(_render(world, own_prompts, render_seed))
                    single_acc.append(_score(world, single_images[-1], [e], stated)[0][0])
                    own_acc.append(_score(world, own_images[-1], [e], stated)[0][0])
                    grid[f"single: {e['theme']}"] = single_images[-1]
                for row, acc, images in (("single", single_acc, single_images),
                                         ("single_own_trigger", own_acc, own_images)):
                    pooled = world.readout.predict(np.concatenate(images))
                    rows[row][k].append({"acc": acc, "ratio": [1.0] * len(entries),
                                         "prompt": scene_accuracy(pooled, stated * len(entries)),
                                         "set": [e["theme"] for e in entries]})
                for name in ["base", *methods]:
                    method = get(ROW_METHOD.get(name, name))
                    with method.apply(world.pipe, lo, gates=gate_for.get(name)):
                        images = _render(world, prompts, render_seed)
                        ratio = [losses[e["theme"]]() / s for e, s in zip(entries, single_loss)]
                    acc, prompt_acc = _score(world, images, entries, stated)
                    rows[name][k].append({"acc": acc, "prompt": prompt_acc, "ratio": ratio,
                                          "set": [e["theme"] for e in entries]})
                    grid[name] = images
                if index == 0:
                    grids[k] = (save_grid(out / f"fusion_k{k}.png", grid), list(grid), prompts)
    report = _aggregate(rows)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fusion.json").write_text(json.dumps(report, indent=1))
    (out / "fusion.md").write_text(_markdown(report, grids, n_sets, n_prompts, world.root, gates, rows, gates_paper))
    return report


def _render(world, prompts: list[str], seed: int) -> np.ndarray:
    from pipelines.world.sampling import generate

    return generate(world.pipe, prompts, seed)


def _markdown(report: Mapping, grids: Mapping, n_sets: int, n_prompts: int, root: Path, gates,
              rows: Mapping[str, dict], gates_paper=None) -> str:
    lines = ["# Fusion of held-out LoRAs", "",
             f"World `{root}`; {n_sets} sets per k, {n_prompts} prompts each; held-out LoRAs only. "
             f"Gates: `{getattr(gates, 'version', 'untrained')}`"
             + (f"; the anchor's (`gated_paper`): `{getattr(gates_paper, 'version', 'untrained')}`"
                if gates_paper is not None else "") + ".", "",
             markdown_table(["method", *KEYS], [(m, *(r[key] for key in KEYS)) for m, r in report.items()]), "",
             *LEGEND, "", *_per_set(rows)]
    for k, (path, labels, prompts) in sorted(grids.items()):
        lines += [f"## k = {k}: first set", "", f"Rows: {', '.join(labels)}.", "",
                  f"Prompts: {'; '.join(prompts[:3])}; ...", "", f"![k={k}]({path.name})", ""]
    return "\n".join(lines)


def _per_set(rows: Mapping[str, dict]) -> list[str]:
    """Each set's concepts and, per row, each concept's accuracy in that order: which concept is a
    set's worst, and whether its own LoRA shows it alone (``single_own_trigger``)."""
    names = [n for n in rows if n != "base"]
    table = [(k, ", ".join(sets[0]["set"]), *(" / ".join(f"{a:.2f}" for a in rows[n][k][i]["acc"]) for n in names))
             for k in (2, 3) for i, sets in enumerate(zip(*(rows[n][k] for n in names)))]
    return ["## Per set: each concept's accuracy, in the order of the set", "",
            markdown_table(["k", "set", *names], table), ""] if table else []
