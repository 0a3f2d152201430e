"""Shared by the fusion and generation reports: world loading, read-out scoring, held-out denoising
loss, image grids and the markdown table."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipelines.world.evaluate import resolve_world_root
from pipelines.world.readout import Readout


@dataclass
class World:
    """A built demo world opened for evaluation."""

    root: Path
    manifest: dict
    pipe: object
    readout: Readout

    @property
    def heldout(self) -> list[dict]:
        return [e for e in self.manifest["loras"] if e["split"] == "heldout"]

    def lora(self, entry: Mapping) -> dict:
        from registry.lora.inspect import load_canonical

        return load_canonical(self.root / entry["file"])[0].layers


def open_world(root: str | Path, pipe=None) -> World:
    """The manifest, base pipeline (or ``pipe``) and read-out of a built world (or its parent holding one)."""
    from diffusers import FluxPipeline

    root = resolve_world_root(root)
    if pipe is None:
        pipe = FluxPipeline.from_pretrained(root / "base")
        pipe.set_progress_bar_config(disable=True)
    return World(root, json.loads((root / "world.json").read_text()), pipe, Readout.load(root / "readout"))


def attr_accuracy(preds: Sequence[Mapping[str, str]], attrs: Mapping[str, str]) -> float:
    """Share of (image, attribute) pairs where the read-out finds ``attrs``' value (nan if none asked)."""
    if not attrs:
        return float("nan")
    return float(np.mean([[p[a] == v for a, v in attrs.items()] for p in preds]))


def scene_accuracy(preds: Sequence[Mapping[str, str]], scenes: Sequence[Mapping[str, str]]) -> float:
    """Mean over images of the share of each image's asked attributes that the read-out finds."""
    scores = [np.mean([p[a] == v for a, v in s.items()]) for p, s in zip(preds, scenes) if s]
    return float(np.mean(scores)) if scores else float("nan")


class HeldoutLoss:
    """A concept's flow-matching loss on fresh images of its theme, with fixed noise and timesteps."""

    def __init__(self, pipe, entry: Mapping, n: int, seed: int) -> None:
        from pipelines.train_gates import theme_of
        from pipelines.world.themes import theme_images
        from pipelines.world.train_base import encode_captions, encode_images, scale_latents

        images, captions = theme_images(theme_of(entry), n, seed)
        self.pipe, self.seed = pipe, seed
        self.x0 = scale_latents(pipe, encode_images(pipe, images))
        self.text = encode_captions(pipe, captions)

    @torch.no_grad()
    def __call__(self) -> float:
        from pipelines.world.train_base import flow_matching_loss, training_scheduler

        gen = torch.Generator().manual_seed(self.seed)
        losses = [flow_matching_loss(self.pipe, self.x0, self.text.prompt_embeds, self.text.pooled,
                                     self.text.text_ids, gen, training_scheduler(self.pipe)).item()
                  for _ in range(4)]
        return float(np.mean(losses))


def save_grid(path: Path, rows: Mapping[str, np.ndarray], scale: int = 3) -> Path:
    """One row of images per label (the label is in the markdown beside it), upscaled ``scale``×."""
    arrays = list(rows.values())
    n = max(len(a) for a in arrays)
    h, w = arrays[0].shape[1:3]
    canvas = np.full((len(arrays) * (h + 2), n * (w + 2), 3), 255, np.uint8)
    for r, images in enumerate(arrays):
        for c, image in enumerate(images):
            canvas[r * (h + 2): r * (h + 2) + h, c * (w + 2): c * (w + 2) + w] = image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas).resize((canvas.shape[1] * scale, canvas.shape[0] * scale), Image.NEAREST).save(path)
    return path


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub markdown table; floats with 3 decimals."""
    def cell(v: object) -> str:
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
