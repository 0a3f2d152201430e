"""``klora``: K-LoRA's per-layer selection (Ouyang et al. 2025), training-free.

Written by hand (no maintained library implements it).  For each layer, each LoRA's score is the
sum of the K largest |ΔW_i| entries (ΔW_i = B_i A_i), divided by that LoRA's mean score over the
layers it covers (K-LoRA's balancing of two LoRAs of different magnitudes); the layer keeps only
the LoRA with the highest score.  K defaults to 8 × the layer's largest rank (a few entries per rank
direction; a free choice of ours, K-LoRA ties K to the LoRA rank as well).

Departures from K-LoRA, said plainly: K-LoRA compares exactly two LoRAs (subject, style); for k > 2
the layer keeps the arg-max over all k.  K-LoRA also rescales the style score over the denoising
steps; here the selection is made once per LoRA set (static), so it runs as one diffusers adapter.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from diffusers import FluxPipeline

from pipelines.fusion_methods.base import FusionMethod, Lora, diffusers_adapters


def topk_score(a: torch.Tensor, b: torch.Tensor, k: int) -> float:
    """Sum of the ``k`` largest |entries| of ΔW = B A."""
    delta = (b.float() @ a.float()).abs().flatten()
    return float(delta.topk(min(k, delta.numel())).values.sum())


def select_layers(loras: Sequence[Lora], k: int | None = None) -> tuple[dict, dict[str, int]]:
    """The composite LoRA (each layer from its winning LoRA) and the winner index per layer."""
    paths = sorted(set().union(*(lora.keys() for lora in loras)))
    raw: dict[str, dict[int, float]] = {}
    for path in paths:
        owners = [i for i, lora in enumerate(loras) if path in lora]
        kk = k or max(int(loras[i][path][0].shape[0]) for i in owners) * 8
        raw[path] = {i: topk_score(*loras[i][path], kk) for i in owners}
    means = {i: sum(s[i] for s in raw.values() if i in s) / max(1, sum(i in s for s in raw.values()))
             for i in range(len(loras))}
    winners = {path: max(s, key=lambda i: s[i] / (means[i] or 1.0)) for path, s in raw.items()}
    return {path: loras[i][path] for path, i in winners.items()}, winners


@contextmanager
def apply(pipe: FluxPipeline, loras: Sequence[Lora], gates: object = None,
          k: int | None = None) -> Iterator[FluxPipeline]:
    """Each layer runs only its top-K-selected LoRA (one composite adapter through diffusers)."""
    loras = [lora for lora in loras if lora]
    if not loras:
        yield pipe
        return
    composite, _ = select_layers(loras, k)
    with diffusers_adapters(pipe, [composite]):
        yield pipe


METHOD = FusionMethod("klora", apply, "K-LoRA per-layer top-K selection (arg-max over k LoRAs, static)")
