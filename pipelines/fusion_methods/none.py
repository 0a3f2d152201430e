"""``none``: the base alone, whatever LoRAs are asked for (the no-LoRA row of every report)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from diffusers import FluxPipeline

from pipelines.fusion_methods.base import FusionMethod, Lora


@contextmanager
def apply(pipe: FluxPipeline, loras: Sequence[Lora], gates: object = None) -> Iterator[FluxPipeline]:
    """Yield ``pipe`` untouched."""
    yield pipe


METHOD = FusionMethod("none", apply, "the base model, no LoRA")
