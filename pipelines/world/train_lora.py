"""LoRA training on the tiny FLUX base, as diffusers' ``train_dreambooth_lora_flux.py`` does it.

``transformer.add_adapter(LoraConfig(..., init_lora_weights="gaussian"))``, only the LoRA
parameters train, the same flow-matching loss as the base (``train_base.flow_matching_loss``),
then ``get_peft_model_state_dict`` gives the weights, which are returned as canonical layers
(module path → (A [r,k], B [d,r]) with ``lora_alpha / r`` folded into B, so ΔW = B @ A) and the
adapter is removed again so the base stays clean for the next LoRA.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from diffusers import FluxPipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from pipelines.world.train_base import (
    encode_captions, encode_images, flow_matching_loss, scale_latents, training_scheduler,
)

Layers = dict[str, tuple[torch.Tensor, torch.Tensor]]
_ADAPTER = "autolora_train"


def train_lora(
    pipe: FluxPipeline, images: np.ndarray, captions: Sequence[str], *, rank: int,
    target_modules: Sequence[str] | str, alpha: float, steps: int, seed: int, lr: float,
    batch_size: int = 8, weighting_scheme: str = "none", losses: list[float] | None = None,
) -> Layers:
    """Train one LoRA on ``images`` (N×32×32×3 uint8) + ``captions``; returns canonical layers.

    ``target_modules`` is PEFT's argument (names like ``"to_q"``, full paths, or a regex), which
    gives partial coverage when wanted. ``losses``, if given, receives the loss curve.
    """
    tr = pipe.transformer
    x0 = scale_latents(pipe, encode_images(pipe, images))
    text = encode_captions(pipe, captions)
    torch.manual_seed(seed)
    targets = target_modules if isinstance(target_modules, str) else list(target_modules)
    prev_active = tr.active_adapters() if getattr(tr, "_hf_peft_config_loaded", False) else []
    grad_before = {n: p.requires_grad for n, p in tr.named_parameters()}
    tr.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights="gaussian"),
                   adapter_name=_ADAPTER)
    try:
        tr.set_adapter(_ADAPTER)
        params = [p for n, p in tr.named_parameters() if f".{_ADAPTER}." in n]
        tr.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=1e-4)
        gen = torch.Generator().manual_seed(seed + 5)
        fm_sched = training_scheduler(pipe)
        tr.train()
        for _ in range(steps):
            idx = torch.randint(0, len(x0), (min(batch_size, len(x0)),), generator=gen)
            loss = flow_matching_loss(pipe, x0[idx], text.prompt_embeds[idx], text.pooled[idx], text.text_ids,
                                      gen, fm_sched, weighting_scheme)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if losses is not None:
                losses.append(loss.item())
        state = get_peft_model_state_dict(tr, adapter_name=_ADAPTER)
        scale = alpha / rank
        layers: Layers = {}
        for key, a in state.items():
            if key.endswith(".lora_A.weight"):
                path = key[: -len(".lora_A.weight")]
                b = state[f"{path}.lora_B.weight"]
                layers[path] = (a.detach().float().clone(), (b.detach().float() * scale).clone())
    finally:
        tr.eval()
        _remove_adapter(pipe, prev_active)
        for n, p in tr.named_parameters():
            p.requires_grad_(grad_before.get(n, p.requires_grad))
    return layers


def _remove_adapter(pipe: FluxPipeline, prev_active: list[str]) -> None:
    """Drop the training adapter; unload PEFT layers entirely when no other adapter is left."""
    tr = pipe.transformer
    if any(a != _ADAPTER for a in getattr(tr, "peft_config", {})):
        tr.delete_adapters(_ADAPTER)
        if prev_active:
            tr.set_adapter(prev_active)
    else:
        tr.unload_lora()


def diffusers_state_dict(layers: Layers) -> dict[str, torch.Tensor]:
    """Canonical layers → diffusers/PEFT transformer keys (``<path>.lora_A.weight`` / ``lora_B``)."""
    out: dict[str, torch.Tensor] = {}
    for path, (a, b) in layers.items():
        out[f"{path}.lora_A.weight"] = a.contiguous()
        out[f"{path}.lora_B.weight"] = b.contiguous()
    return out


def save_diffusers_lora(pipe_cls_or_pipe: type[FluxPipeline] | FluxPipeline, layers: Layers,
                        path: str | Path) -> Path:
    """Write ``layers`` with ``FluxPipeline.save_lora_weights`` (diffusers format, safetensors).

    ``path`` is a ``.safetensors`` file or a directory (then ``pytorch_lora_weights.safetensors``
    inside it). Alpha is already folded into B, so the file needs no alphas: diffusers loads it
    with ``lora_alpha = r`` (scale 1) and ``pipe.load_lora_weights(path)`` reproduces ΔW = B @ A.
    """
    cls = pipe_cls_or_pipe if isinstance(pipe_cls_or_pipe, type) else type(pipe_cls_or_pipe)
    path = Path(path)
    directory, name = (path.parent, path.name) if path.suffix == ".safetensors" else (path, None)
    cls.save_lora_weights(directory, transformer_lora_layers=diffusers_state_dict(layers), weight_name=name)
    return directory / (name or "pytorch_lora_weights.safetensors")
