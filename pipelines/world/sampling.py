"""Render images with the tiny FLUX base, optionally with one canonical LoRA active."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from diffusers import FluxPipeline

from pipelines.world.tiny_flux import MAX_SEQ_LEN
from registry.lora.formats import to_format

STEPS = 12
# True classifier-free guidance (the base is trained with caption dropout). Measured on the default
# base: read-out accuracy is as good at 1.5 as at 3, and LoRA renders (where the LoRA also acts on
# the unconditional branch) are cleaner: theme accuracy 0.80 at 1.5 vs 0.75 at 3.
CFG = 1.5


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
    """Load canonical ``layers`` into the transformer through diffusers' own LoRA loader (what
    ``pipe.load_lora_weights`` calls for FLUX transformer keys); unload on exit."""
    pipe.transformer.load_lora_adapter(to_format(layers, "diffusers"), prefix="transformer", adapter_name=name)
    try:
        yield pipe
    finally:
        pipe.delete_adapters(name)
