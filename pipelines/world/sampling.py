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
LONGEST_SEQ = 512  # the text encoder's own limit (MiniLM's positions; T5's for FLUX.1-dev)


def sequence_length(pipe: FluxPipeline, prompts: Sequence[str]) -> int:
    """Text tokens to encode ``prompts`` with: the length the base was trained with, or the
    longest prompt's when that is longer. A prompt is never cut short: with the trigger words of
    three LoRAs put in front, a 15-token scene description outgrows the demo base's 32 tokens and
    would lose its last words (its style, its background) without a word of warning."""
    tokenizer = getattr(pipe, "tokenizer_2", None)
    if tokenizer is None or not prompts:
        return MAX_SEQ_LEN
    longest = max(len(ids) for ids in tokenizer(list(prompts), verbose=False)["input_ids"])
    return max(MAX_SEQ_LEN, min(longest, LONGEST_SEQ))


@torch.no_grad()
def generate(pipe: FluxPipeline, prompts: Sequence[str], seed: int, *, steps: int = STEPS,
             cfg: float = CFG, size: int = 32, guidance: float | None = None) -> np.ndarray:
    """``len(prompts)`` images as (N, H, W, 3) uint8, deterministic in ``seed``. ``cfg`` > 1: true
    classifier-free guidance against an empty prompt; ``guidance``: a guidance-distilled base's
    guidance scale (FLUX.1-dev's), else the pipeline's default."""
    extra = {} if guidance is None else {"guidance_scale": guidance}
    out = pipe(list(prompts), negative_prompt=[""] * len(prompts), true_cfg_scale=cfg,
               num_inference_steps=steps, height=size, width=size,
               max_sequence_length=sequence_length(pipe, prompts),
               generator=torch.Generator().manual_seed(seed), output_type="np", **extra).images
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
