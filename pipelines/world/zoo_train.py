"""Train the LoRA zoo: one LoRA per theme, with its recipe, sample renders and files.

Each LoRA is a pure function of ``(seed, index, theme)``, so the zoo is trained by a pool of
worker processes (one per core, one torch thread each; measured on 2 cores: two single-thread
processes beat one two-thread process, which slows ~10x whenever anything else runs) and resumes
where a killed build stopped: a LoRA whose file exists is skipped.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from pipelines.world.scene import caption, sample_attributes
from pipelines.world.themes import Theme, theme_images

FORMATS = ("diffusers", "kohya", "comfyui", "kohya", "diffusers", "onetrainer", "comfyui", "bfl_peft")
RANKS = (2, 4, 8, 16)
LORA_LR = 2e-3
TARGETS = {  # peft target_modules: full, attention-only and partial coverage
    "all-linear": ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                   "to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
                   "proj_mlp", "proj_out"],
    "attention": ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"],
    "image-attention": ["to_q", "to_k", "to_v", "to_out.0"],
    # partial coverage by block: every linear layer of the double blocks, none of the single blocks
    "double-blocks": r"transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
                     r"|ff\.net\.(0\.proj|2)|ff_context\.net\.(0\.proj|2))",
}


def lora_recipe(index: int, rng: np.random.Generator) -> dict:
    """Rank, alpha, target modules, file format and metadata choice of the ``index``-th LoRA."""
    target = list(TARGETS)[int(rng.integers(len(TARGETS)))]
    rank = RANKS[int(rng.integers(len(RANKS)))]
    # alpha = max(rank, 8), as trainers who fix network_alpha do: low ranks get a larger scale
    return {"rank": rank, "alpha": float(max(rank, 8)), "target": target, "format": FORMATS[index % len(FORMATS)],
            "kohya_metadata": bool(index % 2 == 0)}


def render_prompts(theme: Theme, n: int, rng: np.random.Generator) -> list[str]:
    """Prompts like those on a LoRA card: the trigger + a scene using the theme's words."""
    prompts = []
    for _ in range(n):
        attrs = sample_attributes(rng, fixed=theme.attrs)
        prompts.append(f"{theme.trigger}, {caption(attrs, rng, words=theme.word_for)}")
    return prompts


def lora_file(root: Path, theme: Theme) -> Path:
    return root / ("loras" if theme.split == "train" else "heldout_loras") / f"{theme.name}.safetensors"


def manifest_entry(root: Path, index: int, theme: Theme, seed: int) -> dict:
    """The manifest row of one zoo LoRA (its recipe included)."""
    recipe = lora_recipe(index, np.random.default_rng([seed, index, 7]))
    return {"theme": theme.name, "family": theme.identity, "split": theme.split, "synonym": theme.synonym,
            "attrs": dict(theme.attrs),
            "words": list(theme.words), "trigger": theme.trigger,
            "file": str(lora_file(root, theme).relative_to(root)), **recipe}


MIN_LORAS_PER_POOL = 16
_PIPE = None  # the base pipeline of this worker process


def _load_base(base_dir: str) -> None:
    global _PIPE
    import torch
    from diffusers import FluxPipeline
    from diffusers.utils import logging

    torch.set_num_threads(1)
    logging.disable_progress_bar()
    _PIPE = FluxPipeline.from_pretrained(base_dir)
    _PIPE.set_progress_bar_config(disable=True)


def make_lora(root: Path, index: int, theme: Theme, seed: int, lora_images: int, lora_steps: int,
              max_renders: int, base_name: str) -> str:
    """Train, render and write the ``index``-th LoRA (in a worker holding the base)."""
    from pipelines.world.sampling import generate, lora_active
    from pipelines.world.train_lora import train_lora
    from pipelines.world.zoo import kohya_metadata, write_hub_repo, write_local

    rng = np.random.default_rng([seed, index, 7])
    recipe = lora_recipe(index, rng)
    images, captions = theme_images(theme, lora_images, seed + index)
    layers = train_lora(_PIPE, images, captions, rank=recipe["rank"], alpha=recipe["alpha"],
                        target_modules=TARGETS[recipe["target"]], steps=lora_steps, seed=seed + index, lr=LORA_LR)
    prompts = render_prompts(theme, 1 + int(rng.integers(max_renders)), rng)
    with lora_active(_PIPE, layers):
        renders = generate(_PIPE, prompts, seed + index)
    metadata = kohya_metadata(theme, recipe["rank"], captions, base_name) if recipe["kohya_metadata"] else None
    local = write_local(lora_file(root, theme).parent, theme, layers, recipe["format"], renders, prompts,
                        metadata, base_name)
    write_hub_repo(root / "hub" / theme.name, theme, layers, local.with_suffix(".json"), base_name)
    return theme.name


def train_zoo(root: Path, base_dir: Path, themes: Sequence[Theme], *, seed: int, lora_images: int,
              lora_steps: int, max_renders: int, base_name: str, progress: bool = True,
              workers: int | None = None) -> None:
    """Make every theme's LoRA whose file is missing, on ``workers`` processes (default: one per core)."""
    todo = [(i, t) for i, t in enumerate(themes) if not lora_file(root, t).is_file()]
    if workers is None:  # a worker costs ~8 s to start (imports + base): not worth it for a few LoRAs
        workers = 1 if len(todo) < MIN_LORAS_PER_POOL else os.cpu_count() or 1
    workers = max(1, min(workers, len(todo)))
    args = (seed, lora_images, lora_steps, max_renders, base_name)
    bar = tqdm(total=len(todo), desc="LoRA zoo", disable=not progress)
    if workers == 1:
        _load_base(str(base_dir))
        for i, t in todo:
            make_lora(root, i, t, *args)
            bar.update()
    else:
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_load_base,
                                 initargs=(str(base_dir),)) as pool:
            for future in as_completed([pool.submit(make_lora, root, i, t, *args) for i, t in todo]):
                future.result()
                bar.update()
    bar.close()
