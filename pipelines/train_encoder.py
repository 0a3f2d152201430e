"""Contrastive training of the LoRA-weight encoder against a frozen text encoder.

Symmetric InfoNCE (ARCHITECTURE eq. 3) between the encoder's embeddings of a batch of LoRAs and
the frozen text embeddings of one text per LoRA (sampled each step among its render prompts, card
text, ...). LoRAs sharing a ``group`` (a theme) are not each other's negatives: their off-diagonal
pairs are masked out of both softmax denominators. Every step augments the LoRAs with
:func:`models.lora_augment.augment` (exact operations on the factors: no new data needed); with
``views`` > 1 each LoRA of the batch comes as that many independent augmentations, each view
paired with the same text and the loss averaged over the views ("repeated augmentation", Hoffer
et al. 2020): the gradient sees more of what the augmentations leave unchanged per step.
Deterministic from ``seed``; the global RNG and thread count are restored afterwards.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Hashable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from models.encoder import EncoderConfig, LayerSpec, LoRAWeightEncoder
from models.lora_augment import augment

Factors = tuple[Tensor, Tensor]
TrainItem = tuple[Mapping[str, Factors], Sequence[str]]  # (LoRA layers, its texts)


class TextEncoder(Protocol):
    """What training needs of the frozen text side: unit vectors, one row per text."""

    def encode(self, texts: list[str]) -> np.ndarray: ...


def _natural_key(name: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def infer_layer_specs(loras: Sequence[Mapping[str, Factors]]) -> list[LayerSpec]:
    """The layers any of ``loras`` adapts, shapes from their factors, in natural name order."""
    shapes: dict[str, tuple[int, int]] = {}
    for lora in loras:
        for name, (a, b) in lora.items():
            shape = (int(b.shape[0]), int(a.shape[1]))
            if shapes.setdefault(name, shape) != shape:
                raise ValueError(f"{name}: shapes {shapes[name]} and {shape} among the LoRAs")
    return [LayerSpec(n, *shapes[n]) for n in sorted(shapes, key=_natural_key)]


def info_nce(lora_emb: Tensor, text_emb: Tensor, scale: Tensor,
             groups: Tensor | None = None) -> Tensor:
    """Symmetric InfoNCE; row ``i`` of both is a positive pair. Off-diagonal pairs of the same
    group are left out of the denominators (they are not negatives)."""
    logits = scale * lora_emb @ text_emb.T
    if groups is not None:
        same = groups.unsqueeze(0) == groups.unsqueeze(1)
        same.fill_diagonal_(False)
        logits = logits.masked_fill(same, float("-inf"))
    target = torch.arange(len(lora_emb), device=lora_emb.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def _group_ids(groups: Sequence[Hashable] | None, n: int) -> Tensor | None:
    if groups is None:
        return None
    if len(groups) != n:
        raise ValueError(f"{len(groups)} group ids for {n} items")
    index: dict[Hashable, int] = {}
    return torch.tensor([index.setdefault(g, len(index)) for g in groups])


def _optimizer(encoder: LoRAWeightEncoder, lr: float, weight_decay: float) -> torch.optim.AdamW:
    decay = [p for p in encoder.parameters() if p.requires_grad and p.dim() >= 2]
    rest = [p for p in encoder.parameters() if p.requires_grad and p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=lr)


def _schedule(steps: int) -> Any:
    warmup = max(1, min(20, steps // 10))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))
    return factor


def train_encoder(items: Sequence[TrainItem], text_encoder: TextEncoder,
                  config: EncoderConfig | None = None, steps: int = 300, batch_size: int = 32,
                  lr: float = 1e-3, seed: int = 0, groups: Sequence[Hashable] | None = None,
                  progress: bool = False, *, layers: Sequence[LayerSpec] | None = None,
                  num_threads: int = 1, weight_decay: float = 0.01,
                  augment_options: Mapping[str, Any] | None = None,
                  probes: Mapping[str, Tensor] | None = None, views: int = 1,
                  ) -> tuple[LoRAWeightEncoder, list[float]]:
    """Train a :class:`LoRAWeightEncoder` on ``items`` and return it (eval mode) and the loss of
    every step. ``layers`` defaults to the layers the items adapt (pass the base model's full
    list so that later LoRAs adapting other layers still count them)."""
    if not items:
        raise ValueError("no training items")
    if any(len(texts) == 0 for _, texts in items):
        raise ValueError("every training item needs at least one text")
    if views < 1:
        raise ValueError(f"views must be at least 1, not {views}")
    config = config or EncoderConfig.ours()
    group_ids = _group_ids(groups, len(items))
    loras = [{n: (a.float(), b.float()) for n, (a, b) in lora.items()} for lora, _ in items]
    texts = [t for _, item_texts in items for t in item_texts]
    starts = np.cumsum([0] + [len(t) for _, t in items])
    text_emb = torch.from_numpy(np.asarray(text_encoder.encode(list(texts)), dtype=np.float32))
    if text_emb.shape[1] != (config.text_dim or config.embed_dim):
        raise ValueError(f"text embeddings are {text_emb.shape[1]}-d, the encoder expects "
                         f"{config.text_dim or config.embed_dim}-d (config.text_dim)")
    # reparametrisation is off by default: the encoder is exactly invariant to it (tested), so it
    # would only cost time; rank truncation (float64 QR+SVD per layer) is the costly one kept
    options = {"p_reparametrise": 0.0, "p_truncate": 0.2, **(augment_options or {})}
    if config.require_all_layers:  # dropping layers would make every LoRA invalid
        options["p_drop"] = 0.0
    threads = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    losses: list[float] = []
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            gen = torch.Generator().manual_seed(seed)
            encoder = LoRAWeightEncoder(layers or infer_layer_specs(loras), config).train()
            if probes is not None:  # fixed probes (e.g. the base's input directions), not trained
                encoder.tokenizer.set_probes(probes)
            optimizer = _optimizer(encoder, lr, weight_decay)
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(steps))
            size = min(batch_size, len(items))
            began = time.perf_counter()
            for step in range(steps):
                batch = torch.randperm(len(items), generator=gen)[:size].tolist()
                picks = [int(starts[i]) + int(torch.randint(int(starts[i + 1] - starts[i]), (),
                                                            generator=gen)) for i in batch]
                augmented = [augment(loras[i], gen, **options) for _ in range(views) for i in batch]
                targets, scale = encoder.project_text(text_emb[picks]), encoder.temperature_scale()
                batch_groups = None if group_ids is None else group_ids[batch]
                loss = sum(info_nce(view, targets, scale, batch_groups)
                           for view in encoder(augmented).split(size)) / views
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(encoder.parameters(), 1.0)
                optimizer.step()
                scheduler.step()
                losses.append(float(loss.detach()))
                if progress and (step % 25 == 0 or step == steps - 1):
                    print(f"step {step + 1}/{steps} loss {losses[-1]:.4f} "
                          f"scale {float(encoder.temperature_scale()):.1f} "
                          f"{time.perf_counter() - began:.1f}s", flush=True)
    finally:
        torch.set_num_threads(threads)
    return encoder.eval(), losses
