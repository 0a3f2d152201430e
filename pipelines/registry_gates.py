"""Fusion gates trained on a registry's own LoRAs: the path for real bases, where there is no demo
world to draw training images from.

Gates belong to the base's layers, so each base needs its own. Eq. 10 needs, per target LoRA,
image–caption pairs of its concept: a registry has them in each LoRA's sample renders (the images
its card or Hub repo came with, or self-rendered ones) and their prompts (the trigger words
included, as at inference), else their captions. Every LoRA of the base with at least one such
pair joins the pool (optionally narrowed by a SQL ``where``); the rest are listed as skipped.
Training itself is ``pipelines.train_gates.train_gates`` (eq. 10 steps: there are no world themes
to compose), cached by version (base, pool, captions, recipe, image size).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipelines.encoder_pool import pool_condition
from pipelines.train_gates import GateRecipe, GateTraining, PoolLora, gate_version, train_gates
from registry import Registry
from registry.captions import SELF_RENDERED

GATES_DIR = "gates"  # checkpoints beside the registry's tables: <registry>/gates/
_COLUMNS = ["lora_id", "sha256", "blob", "render_prompts", "render_blobs", "captions", "trigger_words"]


@dataclass
class RegistryGates:
    """The trained (or cached) gates and which LoRAs could not take part."""

    training: GateTraining
    pool: list[str]
    skipped: dict[str, str] = field(default_factory=dict)  # lora id -> why


def render_pairs(reg: Registry, row: dict) -> list[tuple[Path, str]]:
    """A row's (render image file, text) pairs: the render's prompt, else its caption."""
    prompts, blobs, captions = (list(row.get(k) or []) for k in ("render_prompts", "render_blobs", "captions"))
    pairs = []
    for i, blob in enumerate(blobs):
        prompt = prompts[i].removeprefix(SELF_RENDERED) if i < len(prompts) else ""
        text = (prompt or (captions[i] if i < len(captions) else "")).strip()
        if blob and text and (reg.root / blob).is_file():
            pairs.append((reg.root / blob, text))
    return pairs


def _images(files: list[Path], size: int) -> np.ndarray:
    from PIL import Image

    out = np.empty((len(files), size, size, 3), np.uint8)
    for i, file in enumerate(files):
        with Image.open(file) as image:
            out[i] = np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC))
    return out


def registry_pool(reg: Registry, base_model: str, size: int, where: str | None = None
                  ) -> tuple[list[PoolLora], dict[str, str]]:
    """The gate-training pool of ``base_model``'s LoRAs, images at ``size`` px; and the skipped ones."""
    from registry.lora.inspect import load_canonical

    condition = pool_condition(base_model, where)
    n = reg.loras.count_rows(condition)
    rows = sorted(reg.rows(reg.loras, condition, n, _COLUMNS) if n else [], key=lambda r: r["lora_id"])
    pool, skipped, bases = [], {}, reg.bases()
    for row in rows:
        pairs = render_pairs(reg, row)
        if not pairs:
            skipped[row["lora_id"]] = "no sample render with a prompt or caption (caption or self-render it first)"
            continue
        try:
            images = _images([file for file, _ in pairs], size)
            layers = load_canonical(reg.root / row["blob"], bases)[0].layers
        except (OSError, ValueError) as error:  # an unreadable render or blob loses this LoRA only
            skipped[row["lora_id"]] = f"unreadable: {error}"
            continue
        pool.append(PoolLora(row["lora_id"], layers, images, [text for _, text in pairs], row["sha256"],
                             trigger=next(iter(row.get("trigger_words") or []), "")))
    return pool, skipped


def only_base_with_loras(reg: Registry) -> str:
    """The registry's base model when its LoRAs have exactly one known base (else ValueError)."""
    known = {b.name for b in reg.bases()}
    bases = sorted({r["base_model"] for r in reg.column_rows(reg.loras, ["base_model"])} & known)
    if len(bases) != 1:
        raise ValueError(f"the registry's LoRAs have {len(bases)} known base models ({', '.join(bases) or 'none'}): "
                         "name one with base_model")
    return bases[0]


def train_registry_gates(reg: Registry, base: str, *, base_model: str | None = None, where: str | None = None,
                         recipe: GateRecipe = GateRecipe(), size: int | None = None, out_dir: str | Path | None = None,
                         progress: Callable[[int, float], None] | None = None) -> RegistryGates:
    """Gates for the base pipeline ``base`` (folder, demo world or Hub id) trained on the registry's
    LoRAs of ``base_model`` (default: the only base its LoRAs have), cached in ``out_dir`` (default
    ``<registry>/gates``); ``size``: training image size (default: the base's render size)."""
    from diffusers import FluxPipeline

    from models.torch_threads import one_torch_thread
    from pipelines.generate import RenderSettings, loading_output, resolve_base

    def load() -> FluxPipeline:
        with loading_output():
            loaded = FluxPipeline.from_pretrained(source)
        loaded.set_progress_bar_config(disable=True)
        return loaded

    source = resolve_base(base)
    base_model = base_model or only_base_with_loras(reg)
    out = Path(out_dir) if out_dir is not None else reg.root / GATES_DIR
    pipe = None
    if size is None:
        pipe = load()
        size = RenderSettings.for_base(pipe).size
    pool, skipped = registry_pool(reg, base_model, size, where)
    if len(pool) < 2:
        raise ValueError(f"gate training needs at least two LoRAs of {base_model!r} with sample renders; "
                         f"{len(pool)} have them ({len(skipped)} skipped: no render with a prompt or caption)")
    base_id = f"{source}|{base_model}|{size}px"
    if (out / f"gates-{gate_version(base_id, pool, recipe)}.safetensors").is_file():
        return RegistryGates(train_gates(None, pool, out, base_id=base_id, recipe=recipe),  # type: ignore[arg-type]
                             [p.lora_id for p in pool], skipped)
    pipe = pipe or load()
    with one_torch_thread():
        training = train_gates(pipe, pool, out, base_id=base_id, recipe=recipe, progress=progress)
    return RegistryGates(training, [p.lora_id for p in pool], skipped)


def latest_registry_gates(reg: Registry, base: str) -> Path | None:
    """The newest gate checkpoint in ``<registry>/gates`` trained for the base pipeline ``base``."""
    import json

    from safetensors import safe_open

    from pipelines.generate import resolve_base

    source, found = resolve_base(base), []
    for path in (reg.root / GATES_DIR).glob("gates-*.safetensors"):
        try:
            with safe_open(str(path), "pt") as f:
                meta = json.loads((f.metadata() or {}).get("meta") or "{}")
        except (OSError, ValueError):  # not a checkpoint of ours: not a candidate
            continue
        if str(meta.get("base", "")).startswith(f"{source}|"):
            found.append((path.stat().st_mtime, path))
    return max(found)[1] if found else None
