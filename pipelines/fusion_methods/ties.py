"""``ties``: TIES-merging of the LoRAs' ΔW (PEFT ``ties_svd``)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from diffusers import FluxPipeline

from pipelines.fusion_methods.base import FusionMethod, Lora
from pipelines.fusion_methods.peft_merge import peft_merged

DENSITY = 0.5


@contextmanager
def apply(pipe: FluxPipeline, loras: Sequence[Lora], gates: object = None,
          density: float = DENSITY) -> Iterator[FluxPipeline]:
    """The TIES merge of ``loras`` (trim to ``density``, sign election, disjoint sum, SVD) active."""
    with peft_merged(pipe, loras, "ties_svd", density):
        yield pipe


METHOD = FusionMethod("ties", apply, f"PEFT add_weighted_adapter ties_svd, density {DENSITY}")
