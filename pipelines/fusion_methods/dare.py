"""``dare``: DARE (drop and rescale) of the LoRAs' ΔW, then a linear sum (PEFT ``dare_linear_svd``)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from diffusers import FluxPipeline

from pipelines.fusion_methods.base import FusionMethod, Lora
from pipelines.fusion_methods.peft_merge import peft_merged

DENSITY = 0.5


@contextmanager
def apply(pipe: FluxPipeline, loras: Sequence[Lora], gates: object = None, density: float = DENSITY,
          seed: int = 0) -> Iterator[FluxPipeline]:
    """The DARE merge of ``loras`` (keep each ΔW entry with probability ``density``, rescale) active."""
    with peft_merged(pipe, loras, "dare_linear_svd", density, seed):
        yield pipe


METHOD = FusionMethod("dare", apply, f"PEFT add_weighted_adapter dare_linear_svd, density {DENSITY}")
