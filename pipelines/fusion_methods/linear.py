"""``linear``: every LoRA added at weight 1 through diffusers' ``set_adapters`` (plain addition)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from diffusers import FluxPipeline

from pipelines.fusion_methods.base import FusionMethod, Lora, diffusers_adapters


@contextmanager
def apply(pipe: FluxPipeline, loras: Sequence[Lora], gates: object = None,
          weights: Sequence[float] | None = None) -> Iterator[FluxPipeline]:
    """All ``loras`` active at ``weights`` (default 1 each); the adapters are removed on exit."""
    with diffusers_adapters(pipe, loras, weights):
        yield pipe


METHOD = FusionMethod("linear", apply, "diffusers set_adapters, weight 1 each")
