"""TIES / DARE on ΔW through PEFT: ``LoraModel.add_weighted_adapter`` with a ``*_svd`` combination type.

PEFT computes each LoRA's ΔW_i = B_i A_i per layer, merges them (TIES: trim to ``density``, elect
signs, disjoint sum; DARE: random drop at ``1 - density`` and rescale), and factors the result back
into one LoRA by SVD at ``svd_rank``.  The LoRAs are injected as PEFT adapters with one config each
(``rank_pattern``/``alpha_pattern`` = each layer's own rank, so the scale is 1 and ΔW = B A), and
everything is unloaded on exit.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from diffusers import FluxPipeline
from peft import LoraConfig
from peft.tuners.lora import LoraModel

from pipelines.fusion_methods.base import Lora

MERGED = "autolora_merged"


def _config(lora: Lora) -> LoraConfig:
    ranks = {path: int(a.shape[0]) for path, (a, _) in lora.items()}
    r = max(ranks.values())
    pattern = {re.escape(p): rp for p, rp in ranks.items()}
    return LoraConfig(r=r, lora_alpha=r, target_modules=sorted(ranks), rank_pattern=pattern,
                      alpha_pattern=dict(pattern), init_lora_weights=False)


def merged_rank(loras: Sequence[Lora]) -> int:
    """Rank of the merged LoRA: the sum of the ranks (ΔW sums have at most that rank), capped by
    the smallest covered layer's width."""
    total = sum(max(int(a.shape[0]) for a, _ in lora.values()) for lora in loras)
    widths = [min(a.shape[1], b.shape[0]) for lora in loras for a, b in lora.values()]
    return max(1, min(total, min(widths)))


@contextmanager
def peft_merged(pipe: FluxPipeline, loras: Sequence[Lora], combination_type: str, density: float,
                seed: int = 0) -> Iterator[FluxPipeline]:
    """``loras`` merged by PEFT's ``combination_type`` (e.g. ``ties_svd``) active on ``pipe.transformer``."""
    loras = [lora for lora in loras if lora]
    if not loras:
        yield pipe
        return
    tr = pipe.transformer
    if getattr(tr, "peft_config", None):
        raise RuntimeError("the transformer already holds PEFT adapters; unload them first")
    names = [f"autolora_merge{i}" for i in range(len(loras))]
    model = None
    try:
        model = LoraModel(tr, _config(loras[0]), names[0])
        for name, lora in zip(names[1:], loras[1:]):
            model.peft_config[name] = _config(lora)
            model.inject_adapter(tr, name)
        with torch.no_grad():
            for name, lora in zip(names, loras):
                for path, (a, b) in lora.items():
                    layer = tr.get_submodule(path)
                    layer.lora_A[name].weight.copy_(a)
                    layer.lora_B[name].weight.copy_(b)
        with torch.random.fork_rng(devices=[]):  # DARE's random drop: deterministic, no global side effect
            torch.manual_seed(seed)
            model.add_weighted_adapter(names, [1.0] * len(names), MERGED, combination_type=combination_type,
                                       svd_rank=merged_rank(loras), density=density)
        model.set_adapter(MERGED)
        yield pipe
    finally:
        if model is not None:
            model.unload()
        if hasattr(tr, "peft_config"):
            del tr.peft_config
