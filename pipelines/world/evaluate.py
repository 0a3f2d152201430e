"""Measure a built demo world: does the base follow prompts, do the zoo's LoRAs show their themes.

* **Base**: renders of canonical captions of random scenes, read back per attribute and compared
  with the prompt (chance is 1 / number of values).
* **LoRAs**: for each zoo LoRA, prompts as a user writes them for a trigger-word LoRA: the trigger
  plus a scene that describes the *other* attributes and leaves the theme's own unsaid. The same
  prompts and seeds are rendered with and without the LoRA; a render's theme score is the share of
  the theme's attributes the read-out finds in it. Without the LoRA the base can only guess the
  theme (≈ chance), so the gap is what the LoRA itself adds. The scores are also given by split
  and by the recipe's coverage and rank: what a fusion of held-out LoRAs can keep is bounded by
  what each shows alone.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from models.torch_threads import one_torch_thread
from pipelines.world.readout import Readout, accuracy
from pipelines.world.scene import ATTRIBUTES, caption, sample_attributes

CHANCE = {a: 1.0 / len(v) for a, v in ATTRIBUTES.items()}


@dataclass
class LoraScore:
    """Theme read-out accuracy of one zoo LoRA's renders, with and without the LoRA."""

    theme: str
    split: str
    attrs: dict[str, str]
    with_lora: float
    without_lora: float
    coverage: str  # the recipe's target modules (a key of ``zoo_train.TARGETS``)
    rank: int


def base_prompts(n: int, seed: int) -> tuple[list[str], list[dict[str, str]]]:
    """``n`` canonical captions of random scenes and the scenes themselves."""
    rng = np.random.default_rng([seed, 0xE7A1])
    scenes = [sample_attributes(rng) for _ in range(n)]
    return [caption(s, rng) for s in scenes], scenes


def base_prompt_following(pipe, readout: Readout, n: int = 192, seed: int = 0) -> dict[str, float]:
    """Per-attribute read-out accuracy of base renders against their prompts."""
    from pipelines.world.sampling import generate

    prompts, scenes = base_prompts(n, seed)
    images = np.concatenate([generate(pipe, prompts[k:k + 64], seed + k) for k in range(0, n, 64)])
    return accuracy(readout, images, scenes)


def theme_prompts(trigger: str, attrs: Mapping[str, str], n: int, seed: int) -> list[str]:
    """The trigger + a scene whose theme attributes are left out of the text."""
    rng = np.random.default_rng([seed, 0x7E3E])
    return [f"{trigger}, {caption(sample_attributes(rng, attrs), rng, omit=attrs)}" for _ in range(n)]


def theme_score(readout: Readout, images: np.ndarray, attrs: Mapping[str, str]) -> float:
    """Mean over renders and theme attributes of "the read-out finds the theme's value"."""
    preds = readout.predict(images)
    return float(np.mean([[p[a] == v for a, v in attrs.items()] for p in preds]))


def lora_scores(pipe, readout: Readout, root: Path, entries: list[dict], n: int = 8, seed: int = 0,
                progress: bool = False) -> list[LoraScore]:
    """Score every manifest entry's LoRA file (loaded from disk through the registry's reader)."""
    from pipelines.world.sampling import generate, lora_active
    from registry.lora.inspect import load_canonical

    scores = []
    for entry in tqdm(entries, desc="LoRA read-out", disable=not progress):
        prompts = theme_prompts(entry["trigger"], entry["attrs"], n, seed)
        without = generate(pipe, prompts, seed)
        lora, _ = load_canonical(root / entry["file"])
        with lora_active(pipe, lora.layers):
            with_ = generate(pipe, prompts, seed)
        scores.append(LoraScore(entry["theme"], entry["split"], dict(entry["attrs"]),
                                theme_score(readout, with_, entry["attrs"]),
                                theme_score(readout, without, entry["attrs"]),
                                entry["target"], int(entry["rank"])))
    return scores


def grouped(scores: list[LoraScore], key: str) -> dict[str, dict[str, float]]:
    """``{value of key: {"count", "with_lora", "without_lora"}}`` over ``scores``."""
    groups: dict[object, list[LoraScore]] = {}
    for s in scores:
        groups.setdefault(getattr(s, key), []).append(s)
    return {str(g): {"count": len(m), "with_lora": float(np.mean([s.with_lora for s in m])),
                     "without_lora": float(np.mean([s.without_lora for s in m]))} for g, m in sorted(groups.items())}


def evaluate_world(world_dir: str | Path, *, n_base: int = 192, n_lora: int = 8, seed: int = 0,
                   progress: bool = True) -> dict:
    """Evaluate a world built by ``build_world`` (the ``<size>-seed<seed>`` folder, or its parent
    holding exactly one); returns the ``autolora world eval --json`` report."""
    from diffusers import FluxPipeline

    root = resolve_world_root(world_dir)
    manifest = json.loads((root / "world.json").read_text())
    readout = Readout.load(root / "readout")
    pipe = FluxPipeline.from_pretrained(root / "base")
    pipe.set_progress_bar_config(disable=True)
    with one_torch_thread():
        base = base_prompt_following(pipe, readout, n_base, seed)
        scores = lora_scores(pipe, readout, root, manifest["loras"], n_lora, seed, progress)
    with_ = float(np.mean([s.with_lora for s in scores]))
    without = float(np.mean([s.without_lora for s in scores]))
    return {
        "world": str(root),
        "base": {"accuracy": base, "chance": CHANCE, "prompts": n_base},
        "loras": {"count": len(scores), "prompts_each": n_lora, "with_lora": with_, "without_lora": without,
                  "gain": with_ - without, "by_split": grouped(scores, "split"),
                  "by_coverage": grouped(scores, "coverage"), "by_rank": grouped(scores, "rank"),
                  "per_lora": [asdict(s) for s in scores]},
    }


class WorldNotFound(FileNotFoundError):
    """No single built demo world where one was given; the message says where and how to build one."""


def resolve_world_root(world_dir: str | Path) -> Path:
    """``world_dir`` itself if it holds ``world.json``, else its single built world subfolder
    (else :class:`WorldNotFound`)."""
    world_dir = Path(world_dir)
    if (world_dir / "world.json").is_file():
        return world_dir
    found = sorted(p.parent for p in world_dir.glob("*/world.json"))
    if len(found) > 1:
        raise WorldNotFound(f"{len(found)} demo worlds under {world_dir}: name one of "
                            f"{[p.name for p in found]}")
    if not found:
        raise WorldNotFound(f"no demo world at {world_dir} (no world.json there or in a subfolder): "
                            "build one with `autolora world build --out DIR`")
    return found[0]
