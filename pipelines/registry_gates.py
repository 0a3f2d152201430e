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

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipelines.encoder_pool import pool_condition, pool_size
from pipelines.train_gates import GateRecipe, GateTraining, PoolLora, gate_version, save_gates, train_gates
from registry import Registry
from registry.atomic_write import write_atomically
from registry.captions import SELF_RENDERED
from registry.hashing import sha256_file

GATES_DIR = "gates"  # checkpoints beside the registry's tables: <registry>/gates/
WEIGHTS_CACHE = "base-weights.json"  # in GATES_DIR: the sha256 of base weight files hashed (base_weights_id)
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
    known = set(reg.base_names())
    bases = sorted({r["base_model"] for r in reg.column_rows(reg.loras, ["base_model"])} & known)
    if len(bases) != 1:
        raise ValueError(f"the registry's LoRAs have {len(bases)} known base models ({', '.join(bases) or 'none'}): "
                         "name one with base_model")
    return bases[0]


class PoolTooSmall(ValueError):
    """Fewer than two LoRAs of the pool have sample renders; ``skipped`` says why for the rest."""

    def __init__(self, message: str, skipped: dict[str, str]) -> None:
        super().__init__(message)
        self.skipped = skipped


def count_pool(reg: Registry, base_model: str, where: str | None) -> int:
    """How many LoRAs the pool's filter matches; an unknown base model or a ``where`` that matches
    nothing (or does not parse) is a ValueError saying so, before any model is loaded."""
    n = pool_size(reg, base_model, where)  # PoolError (a ValueError) for an unknown base or a bad filter
    if not n:
        raise ValueError(f"the filter (where) {where!r} matched no LoRAs of {base_model!r}" if where
                         else f"the registry has no LoRAs of {base_model!r}")
    return n


def train_registry_gates(reg: Registry, base: str, *, base_model: str | None = None, where: str | None = None,
                         recipe: GateRecipe = GateRecipe(), size: int | None = None, out_dir: str | Path | None = None,
                         progress: Callable[[int, float], None] | None = None, device: str | None = None,
                         dtype: str | None = None) -> RegistryGates:
    """Gates for the base pipeline ``base`` (folder, demo world or Hub id) trained on the registry's
    LoRAs of ``base_model`` (default: the only base its LoRAs have), cached in ``out_dir`` (default
    ``<registry>/gates``; a cache hit becomes the newest checkpoint, the one generate picks);
    ``size``: training image size (default: the base's render size); ``device`` / ``dtype``: where
    and in what precision the base runs (``load_base``; the gates themselves train in float32; gates
    trained on a base run in another precision are cached apart).
    Bad input is a ValueError (:class:`PoolTooSmall` when too few LoRAs have renders) raised before
    the base is loaded."""
    from models.torch_device import pick_device, pick_dtype
    from models.torch_threads import one_torch_thread
    from pipelines.generate import (
        RenderSettings, base_config, check_size, load_base, resolve_base, size_multiple, stored_dtype,
    )

    source = resolve_base(base)
    base_model = base_model or only_base_with_loras(reg)
    matched = count_pool(reg, base_model, where)
    usual = RenderSettings.for_transformer(base_config(source, "transformer")).size
    size = size or usual
    check_size(size, size_multiple(base_config(source, "vae")), usual)
    out = Path(out_dir) if out_dir is not None else reg.root / GATES_DIR
    pool, skipped = registry_pool(reg, base_model, size, where)
    if len(pool) < 2:
        raise PoolTooSmall(
            f"gate training needs at least two LoRAs of {base_model!r} with sample renders; {len(pool)} of the "
            f"{matched} matched have them. Render and caption the others with 'autolora caption --registry R "
            f"--model CAPTIONER --base {base_model}=PIPELINE'", skipped)
    # the precision the base runs in shapes what the gates learn (the device does not): gates trained on a
    # bfloat16 base are other gates than on a float32 one (float32, the CPU's, keeps the key it always had)
    precision = pick_dtype(dtype, pick_device(device), stored_dtype(source))
    base_id = f"{source}|{base_model}|{size}px" + ("" if _name(precision) == "float32" else f"|{_name(precision)}")
    weights = base_weights_id(source, out / WEIGHTS_CACHE)
    if (out / f"gates-{gate_version(base_id, pool, recipe)}.safetensors").is_file():
        training = train_gates(None, pool, out, base_id=base_id, recipe=recipe)  # type: ignore[arg-type]
        if weights and training.gates.meta.get("base_weights") != weights:  # gates trained before it was kept
            training.gates.meta["base_weights"] = weights
            save_gates(training.path, training.gates)
        os.utime(training.path)  # asked for again: the newest for this base
        return RegistryGates(training, [p.lora_id for p in pool], skipped)
    pipe = load_base(source, device=device, dtype=precision)
    weights = weights or base_weights_id(source, out / WEIGHTS_CACHE)  # a Hub base is here once loaded
    with one_torch_thread():
        training = train_gates(pipe, pool, out, base_id=base_id, recipe=recipe, progress=progress,
                               meta={"base_weights": weights,
                                     "trained_on": f"{pipe.device.type} {_name(pipe.transformer.dtype)}"})
    return RegistryGates(training, [p.lora_id for p in pool], skipped)


def _name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _checkpoints(reg: Registry) -> list[tuple[float, str, str, dict]]:
    """(mtime, path, version, meta) of every gate checkpoint in ``<registry>/gates`` (headers only)."""
    from safetensors import SafetensorError, safe_open

    found = []
    for path in (reg.root / GATES_DIR).glob("gates-*.safetensors"):
        try:
            with safe_open(str(path), "pt") as f:
                header = f.metadata() or {}
            meta = json.loads(header.get("meta") or "{}")
            mtime = path.stat().st_mtime
        except (OSError, ValueError, SafetensorError):  # not a checkpoint of ours (or gone meanwhile): not a candidate
            continue
        found.append((mtime, str(path), header.get("version", ""), meta))
    return found


def base_weights_id(source: str, cache: Path | None = None) -> str | None:
    """What a base pipeline's transformer weights are, wherever they lie: sha256 over the sha256 of
    each weight file diffusers loads (:func:`pipelines.generate.transformer_weight_files`), so equal
    for a Hub base's cached snapshot and a local copy of it and other for any changed weight.  A file
    in the Hugging Face cache is an LFS blob named by its sha256 (free); others are hashed once
    (FLUX.1-dev's 24 GB: ~15-40 s) and remembered in the JSON ``cache`` by path, size, mtime and
    inode.  ``source`` as :func:`pipelines.generate.resolve_base` gives it; None when its files are
    not here (a Hub base not downloaded).  Written by hand: diffusers and huggingface_hub identify
    a pipeline only by its repo id and revision."""
    import hashlib

    from pipelines.generate import transformer_weight_files

    files = transformer_weight_files(source)
    if not files:
        return None
    try:
        known = json.loads(cache.read_text()) if cache is not None and cache.is_file() else {}
    except (OSError, ValueError):
        known = {}
    digest, learned = hashlib.sha256(), {}
    try:
        for file in files:
            digest.update(f"{file.name}:{_file_sha256(file.resolve(), known, learned)}\n".encode())
    except OSError:
        return None
    if learned and cache is not None:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(cache, json.dumps({**known, **learned}, indent=1))
        except OSError:  # a read-only registry: hashed again next time
            pass
    return digest.hexdigest()[:16]


def _file_sha256(path: Path, known: dict, learned: dict) -> str:
    if path.parent.name == "blobs" and len(path.name) == 64 and all(c in "0123456789abcdef" for c in path.name):
        return path.name  # the Hugging Face cache keeps an LFS file as blobs/<its sha256>
    st = path.stat()
    key = f"{path}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"
    if key not in known:
        learned[key] = sha256_file(path)
    return known.get(key) or learned[key]


def newest_gates(reg: Registry, source: str, base_model: str | None = None) -> tuple[Path, str, dict] | None:
    """The newest checkpoint in ``<registry>/gates`` trained for the resolved base pipeline
    ``source`` (and on ``base_model``'s LoRAs when given; newest: last trained or last asked for
    by :func:`train_registry_gates`): its path, version and meta (pool, recipe); headers only.
    A base is matched by its spelling (a Hub id, or a folder's resolved path) or by its weights
    (:func:`base_weights_id`: a local copy of a Hub base finds the gates trained on the Hub id)."""
    prefix = f"{source}|{base_model}|" if base_model else f"{source}|"
    checkpoints = _checkpoints(reg)
    found = [c for c in checkpoints if str(c[3].get("base", "")).startswith(prefix)]
    others = [c for c in checkpoints if c not in found and c[3].get("base_weights")
              and (base_model is None or trained_for(c[3])[1] == base_model)]
    if others:  # the base's weights are hashed only when some gates could match by them
        weights = base_weights_id(source, reg.root / GATES_DIR / WEIGHTS_CACHE)
        found += [c for c in others if weights is not None and c[3]["base_weights"] == weights]
    if not found:
        return None
    _, path, version, meta = max(found)
    return Path(path), version, meta


def gate_bases(reg: Registry) -> list[str]:
    """The base pipelines (as spelled when trained) that ``<registry>/gates`` holds gates for."""
    return sorted({trained_for(c[3])[0] for c in _checkpoints(reg)} - {""})


def trained_for(meta: dict) -> tuple[str, str]:
    """(the base pipeline as spelled when trained, the base model of its LoRAs) of a gate checkpoint's
    meta, from its ``base`` (``SOURCE|BASE_MODEL|SIZEpx[|PRECISION]``); empty strings where missing."""
    source, base_model, *_ = str(meta.get("base", "")).split("|") + ["", ""]
    return source, base_model
