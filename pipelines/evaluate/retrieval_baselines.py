"""The retrieval evaluation's comparison rows: each gives one embedding per held-out LoRA in the
query space (the frozen text encoder's), ranked by cosine like the weight channel.

* ``paper_design``: the authors' encoder (one probe, causal mask, mean pool, fixed temperature,
  every layer required), trained on the same pool by the same pipeline. It cannot read a LoRA
  that leaves layers out, so those layers are given as zero (rank-1 zero factors), which is what
  a user of it must do.
* ``weight_stats``: no learning. A LoRA's weights are described by fixed random probes of every
  layer (``ΔW p`` for one seeded probe ``p`` per layer, computed as ``B (A p)``, zero for absent
  layers); a held-out LoRA's embedding is the mean text embedding of its 5 nearest training LoRAs
  (cosine of those descriptions).
* ``render_read``: no learning either, as CARLoS describes LoRAs by rendering them: each LoRA
  renders neutral prompts on the base, the world's attribute read-out reads the renders, and the
  majority value of each attribute, written as words, is embedded.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from models.text_encoder import default_text_encoder
from pipelines.encoder_pool import zero_filled
from pipelines.world.scene import ATTRIBUTES

Factors = Mapping[str, tuple[torch.Tensor, torch.Tensor]]
NEIGHBOURS = 5
NEUTRAL_PROMPTS = ("", "an image", "a picture", "a shape")


def paper_embeddings(encoder, loras: Sequence[Factors]) -> np.ndarray:
    """The authors' encoder over its own layer list (missing layers zero-filled)."""
    with torch.no_grad():
        return encoder([zero_filled(lora, encoder.layers) for lora in loras]).float().numpy()


def probe_features(lora: Factors, shapes: Mapping[str, tuple[int, int]], seed: int = 0) -> np.ndarray:
    """Concatenated ``ΔW p`` of every base layer for one fixed probe per layer (zero if absent)."""
    gen = torch.Generator().manual_seed(seed)
    parts = []
    for name, (d, k) in sorted(shapes.items()):
        probe = torch.randn(k, generator=gen) / k ** 0.5
        if name in lora:
            a, b = lora[name]
            parts.append((b.float() @ (a.float() @ probe)).numpy())
        else:
            parts.append(np.zeros(d, np.float32))
    return np.concatenate(parts)


def weight_stats_embeddings(train: Sequence[Factors], train_texts: Sequence[Sequence[str]],
                            heldout: Sequence[Factors], shapes: Mapping[str, tuple[int, int]]) -> np.ndarray:
    """Mean text embedding of each held-out LoRA's nearest training LoRAs by probe features."""
    def normed(x: np.ndarray) -> np.ndarray:
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    f_train = normed(np.stack([probe_features(x, shapes) for x in train]))
    f_held = normed(np.stack([probe_features(x, shapes) for x in heldout]))
    encoder = default_text_encoder()
    text = np.stack([encoder.encode(list(texts)).mean(axis=0) for texts in train_texts])
    nearest = np.argsort(-(f_held @ f_train.T), axis=1)[:, :NEIGHBOURS]
    return normed(text[nearest].mean(axis=1))


def describe(readings: Sequence[Mapping[str, str]]) -> str:
    """Words for the majority value of every attribute over some renders' read-outs."""
    top = {a: Counter(r[a] for r in readings).most_common(1)[0][0] for a in ATTRIBUTES}
    return f"a {top['colour']} {top['shape']} on a {top['background']} background, {top['style']} style"


def render_read_embeddings(world_root: Path, loras: Sequence[Factors], seed: int = 0,
                           progress: bool = False) -> tuple[np.ndarray, list[str]]:
    """Render each LoRA from neutral prompts, read the renders, embed the description (diffusers'
    loading bars and warnings on stderr only with ``progress``)."""
    from diffusers import FluxPipeline

    from models.torch_threads import one_torch_thread
    from pipelines.generate import loading_output
    from pipelines.world.readout import Readout
    from pipelines.world.sampling import generate, lora_active

    with loading_output(progress):
        pipe = FluxPipeline.from_pretrained(world_root / "base")
    pipe.set_progress_bar_config(disable=True)  # 29 renders: no bar each
    readout = Readout.load(world_root / "readout")
    texts = []
    with one_torch_thread():
        for i, lora in enumerate(loras):
            layers = {n: (a.float().contiguous(), b.float().contiguous()) for n, (a, b) in lora.items()}
            with lora_active(pipe, layers):
                images = generate(pipe, list(NEUTRAL_PROMPTS), seed + i)
            texts.append(describe(readout.predict(images)))
    return default_text_encoder().encode(texts), texts
