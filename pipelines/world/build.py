"""``autolora world build``: the demo world — a tiny FLUX base trained here, a LoRA zoo trained on
it with diffusers + peft, sample renders and cards — deterministic from one seed and cached.

Layout of ``OUT/<size>-seed<seed>/``: ``base/`` (``FluxPipeline.save_pretrained``),
``base_model.json`` (layer names/shapes for the registry), ``loras/`` and ``heldout_loras/``
(LoRA files + sidecars only, as a local LoRA folder), ``hub/<name>/`` (Hub-style repos),
``world.json`` (the manifest; its presence with the same key makes a rebuild a no-op).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from pipelines.world.scene import caption, sample_attributes
from pipelines.world.themes import Theme, broad_mix, make_themes, theme_images

DEMO_BASE_NAME = "autolora-demo-flux"
WORLD_VERSION = 1  # bump when the recipe changes: invalidates cached worlds
FORMATS = ("diffusers", "kohya", "comfyui", "kohya", "diffusers", "onetrainer", "comfyui", "bfl_peft")
RANKS = (2, 4, 8, 16)
LORA_LR = 2e-3
TARGETS = {  # peft target_modules: full, attention-only and partial (single blocks only) coverage
    "all-linear": ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                   "to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
                   "proj_mlp", "proj_out"],
    "attention": ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"],
    "image-attention": ["to_q", "to_k", "to_v", "to_out.0"],
    "single-blocks": r".*single_transformer_blocks\.\d+\.(attn\.to_q|attn\.to_k|attn\.to_v|proj_mlp|proj_out)",
}


@dataclass(frozen=True)
class WorldSize:
    train: int
    heldout: int
    base_images: int
    base_steps: int
    lora_images: int
    lora_steps: int
    max_renders: int


SIZES = {
    "micro": WorldSize(train=6, heldout=3, base_images=512, base_steps=60, lora_images=16, lora_steps=15,
                       max_renders=2),
    "default": WorldSize(train=60, heldout=20, base_images=6000, base_steps=1500, lora_images=48,
                         lora_steps=60, max_renders=3),
}


def world_key(size: str, seed: int) -> str:
    recipe = json.dumps({"v": WORLD_VERSION, "size": asdict(SIZES[size]), "seed": seed}, sort_keys=True)
    return hashlib.sha256(recipe.encode()).hexdigest()[:16]


def _lora_recipe(index: int, rng: np.random.Generator) -> dict:
    target = list(TARGETS)[int(rng.integers(len(TARGETS)))]
    rank = RANKS[int(rng.integers(len(RANKS)))]
    return {"rank": rank, "alpha": float(rank), "target": target, "format": FORMATS[index % len(FORMATS)],
            "kohya_metadata": bool(index % 2 == 0)}


def render_prompts(theme: Theme, n: int, rng: np.random.Generator) -> list[str]:
    """Prompts like those on a LoRA card: the trigger + a scene using the theme's words."""
    prompts = []
    for _ in range(n):
        attrs = sample_attributes(rng, fixed=theme.attrs)
        prompts.append(f"{theme.trigger}, {caption(attrs, rng, words=theme.word_for)}")
    return prompts


def _train_base(root: Path, spec: WorldSize, seed: int, progress: bool) -> Path:
    from pipelines.world.train_base import train_base

    base = root / "base"
    if (base / "model_index.json").is_file():
        return base
    images, captions, _ = broad_mix(spec.base_images, seed)
    tmp = root / "base.partial"
    train_base(images, captions, steps=spec.base_steps, seed=seed, out_dir=tmp, progress=progress)
    tmp.rename(base)
    return base


def build_world(out: str | Path, size: str = "default", seed: int = 0, progress: bool = True) -> dict:
    """Build (or reuse) the world; returns the ``world build --json`` contract."""
    from diffusers import FluxPipeline

    from pipelines.world.sampling import generate, lora_active
    from pipelines.world.train_lora import train_lora
    from pipelines.world.zoo import kohya_metadata, write_hub_repo, write_local
    from registry.base_models import BaseModel

    t0 = time.perf_counter()
    spec = SIZES[size]
    key = world_key(size, seed)
    root = Path(out) / f"{size}-seed{seed}"
    manifest_path = root / "world.json"
    if manifest_path.is_file() and json.loads(manifest_path.read_text())["key"] == key:
        return _contract(json.loads(manifest_path.read_text()), root, time.perf_counter() - t0)
    root.mkdir(parents=True, exist_ok=True)
    base_dir = _train_base(root, spec, seed, progress)
    pipe = FluxPipeline.from_pretrained(base_dir)
    pipe.set_progress_bar_config(disable=True)
    base_model = BaseModel.from_flux_transformer(DEMO_BASE_NAME, pipe.transformer)
    (root / "base_model.json").write_text(base_model.to_json(), encoding="utf-8")

    themes = make_themes(seed, spec.train, spec.heldout)
    entries = []
    for index, theme in enumerate(tqdm(themes, desc="LoRA zoo", disable=not progress)):
        rng = np.random.default_rng([seed, index, 7])
        recipe = _lora_recipe(index, rng)
        folder = root / ("loras" if theme.split == "train" else "heldout_loras")
        file = folder / f"{theme.name}.safetensors"
        entries.append({"theme": theme.name, "split": theme.split, "synonym": theme.synonym,
                        "attrs": dict(theme.attrs), "words": list(theme.words), "trigger": theme.trigger,
                        "file": str(file.relative_to(root)), **recipe})
        if file.is_file():
            continue
        images, captions = theme_images(theme, spec.lora_images, seed + index)
        layers = train_lora(pipe, images, captions, rank=recipe["rank"], alpha=recipe["alpha"],
                            target_modules=TARGETS[recipe["target"]], steps=spec.lora_steps,
                            seed=seed + index, lr=LORA_LR)
        prompts = render_prompts(theme, 1 + int(rng.integers(spec.max_renders)), rng)
        with lora_active(pipe, layers):
            renders = generate(pipe, prompts, seed + index)
        metadata = kohya_metadata(theme, recipe["rank"], captions, DEMO_BASE_NAME) if recipe["kohya_metadata"] else None
        local = write_local(folder, theme, layers, recipe["format"], renders, prompts, metadata, DEMO_BASE_NAME)
        write_hub_repo(root / "hub" / theme.name, theme, layers, local.with_suffix(".json"), DEMO_BASE_NAME)
    _write_reupload(root, entries)
    manifest = {"key": key, "size": size, "seed": seed, "base_model": DEMO_BASE_NAME, "loras": entries,
                "train": sum(e["split"] == "train" for e in entries),
                "heldout": sum(e["split"] == "heldout" for e in entries),
                "build_seconds": time.perf_counter() - t0}
    manifest_path.write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    return _contract(manifest, root, time.perf_counter() - t0)


def _write_reupload(root: Path, entries: list[dict]) -> None:
    """One train LoRA re-saved in another format, as people re-upload: a fingerprint duplicate."""
    from registry.inspect import load_canonical
    from registry.lora_formats import save_lora

    first = next(e for e in entries if e["split"] == "train")
    lora, _ = load_canonical(root / first["file"])
    fmt = "kohya" if first["format"] != "kohya" else "diffusers"
    save_lora(root / "loras" / f"{first['theme']}-reupload.safetensors", lora.layers, fmt)


def _contract(manifest: dict, root: Path, seconds: float) -> dict:
    return {"base": str(root / "base"), "loras": str(root / "loras"),
            "heldout_loras": str(root / "heldout_loras"), "train": manifest["train"],
            "heldout": manifest["heldout"], "seconds": round(seconds, 3)}
