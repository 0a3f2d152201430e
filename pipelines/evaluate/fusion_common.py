"""Shared by the fusion and generation reports: world loading, read-out scoring, held-out denoising
loss, image grids and the markdown table."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

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

    from pipelines.generate import loading_output

    root = resolve_world_root(root)
    if pipe is None:
        with loading_output():  # no loading bars: a report's progress is its own bar
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


GRID_PAD = 6
"""Pixels of white space around labels and the title in :func:`save_grid`."""
LABEL_SIZE, TITLE_SIZE = 14, 16
"""Font sizes (px) of the row labels and the title in :func:`save_grid`."""


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """PIL's default font at ``size`` px (its fixed bitmap font where FreeType is missing)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # Pillow < 10.1 or no FreeType
        return ImageFont.load_default()


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """``text`` with line breaks between words so that each line fits ``width`` px (a longer word stays whole)."""
    lines: list[str] = []
    for paragraph in text.splitlines() or [""]:
        line = ""
        for word in paragraph.split():
            candidate = f"{line} {word}" if line else word
            if line and draw.textlength(candidate, font=font) > width:
                lines.append(line)
                candidate = word
            line = candidate
        lines.append(line)
    return "\n".join(lines)


def save_grid(path: Path, rows: Mapping[str, np.ndarray], scale: int = 3, title: str | None = None) -> Path:
    """A PNG with one row of (N, H, W, 3) uint8 images per key, upscaled ``scale``× (nearest), each row's key
    as a label in a left margin that fits the longest one, and ``title`` (wrapped) above the grid.

    Rows may hold different image counts (missing cells stay white; a row may be empty) but one image size.
    Raises ``ValueError`` for no rows or mixed image sizes."""
    arrays = [np.asarray(a) for a in rows.values()]
    if not arrays:
        raise ValueError("save_grid: no rows to draw")
    sizes = {a.shape[1:3] for a in arrays}
    if len(sizes) > 1:
        raise ValueError(f"save_grid: rows hold images of different sizes {sorted(sizes)}")
    h, w = sizes.pop()
    n = max(len(a) for a in arrays)
    cells = np.full((len(arrays) * (h + 2), n * (w + 2), 3), 255, np.uint8)
    for r, images in enumerate(arrays):
        for c, image in enumerate(images):
            cells[r * (h + 2): r * (h + 2) + h, c * (w + 2): c * (w + 2) + w] = image
    grid = Image.fromarray(cells).resize((cells.shape[1] * scale, cells.shape[0] * scale), Image.NEAREST)

    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_font, title_font = _font(LABEL_SIZE), _font(TITLE_SIZE)
    labels = [str(k) for k in rows]
    boxes = [measure.multiline_textbbox((0, 0), label, font=label_font) for label in labels]
    margin = max(box[2] for box in boxes) + 2 * GRID_PAD
    width = margin + grid.width
    top, title_text = 0, ""
    if title:
        title_text = _wrap(measure, title, title_font, max(width, 360) - 2 * GRID_PAD)
        box = measure.multiline_textbbox((0, 0), title_text, font=title_font)
        width = max(width, box[2] + 2 * GRID_PAD)
        top = box[3] + 2 * GRID_PAD
    canvas = Image.new("RGB", (width, top + grid.height), (255, 255, 255))
    canvas.paste(grid, (margin, top))
    draw = ImageDraw.Draw(canvas)
    if title_text:
        draw.multiline_text((GRID_PAD, GRID_PAD), title_text, fill=(0, 0, 0), font=title_font)
    for r, (label, box) in enumerate(zip(labels, boxes)):
        y = max(top, top + r * (h + 2) * scale + (h * scale - (box[3] - box[1])) // 2) - box[1]
        draw.multiline_text((GRID_PAD, y), label, fill=(0, 0, 0), font=label_font)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub markdown table; floats with 3 decimals."""
    def cell(v: object) -> str:
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
