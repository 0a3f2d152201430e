"""Render images with the tiny FLUX base, optionally with one canonical LoRA active."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from diffusers import FluxPipeline

from pipelines.world.tiny_flux import MAX_SEQ_LEN
from registry.lora_formats import to_format

STEPS = 12
CFG = 3.0  # true classifier-free guidance (the base is trained with caption dropout)


@torch.no_grad()
def generate(pipe: FluxPipeline, prompts: Sequence[str], seed: int, *, steps: int = STEPS,
             cfg: float = CFG, size: int = 32) -> np.ndarray:
    """``len(prompts)`` images as (N, H, W, 3) uint8, deterministic in ``seed``."""
    out = pipe(list(prompts), negative_prompt=[""] * len(prompts), true_cfg_scale=cfg,
               num_inference_steps=steps, height=size, width=size, max_sequence_length=MAX_SEQ_LEN,
               generator=torch.Generator().manual_seed(seed), output_type="np").images
    return (np.clip(out, 0, 1) * 255).round().astype(np.uint8)


@contextmanager
def lora_active(pipe: FluxPipeline, layers: Mapping[str, tuple[torch.Tensor, torch.Tensor]], name: str = "active"):
    """Load canonical ``layers`` through diffusers' own ``load_lora_weights``; unload on exit."""
    pipe.load_lora_weights(to_format(layers, "diffusers"), adapter_name=name)
    try:
        yield pipe
    finally:
        pipe.delete_adapters(name)
