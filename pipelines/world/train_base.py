"""Train the tiny FLUX base on captioned images with the diffusers FLUX flow-matching recipe.

The objective follows ``train_dreambooth_flux.py`` / ``train_dreambooth_lora_flux.py``:
timesteps drawn with ``compute_density_for_timestep_sampling`` and mapped through the scheduler's
training sigmas, ``noisy = (1 - σ)·x0 + σ·noise``, target ``noise - x0``, latents packed with
``FluxPipeline._pack_latents``, ids from ``FluxPipeline._prepare_latent_image_ids`` and the text
ids of ``encode_prompt``, loss weighted by ``compute_loss_weighting_for_sd3``. Text embeddings
are frozen and computed once per distinct caption; latents are cached as ``latent_dist.mode()``.
Timesteps are uniform by default (the scripts' ``--weighting_scheme none``; measured as good as
logit-normal here). 10 % of captions are dropped to "" so that
``negative_prompt="", true_cfg_scale>1`` (classifier-free guidance) works at inference.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
from diffusers.optimization import get_scheduler
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3
from tqdm.auto import tqdm

from pipelines.world.sampling import sequence_length
from pipelines.world.tiny_flux import build_tiny_flux


@dataclass
class TextCache:
    """Frozen text conditioning for a list of captions (one row per caption)."""

    prompt_embeds: torch.Tensor   # (N, L, 64) T5 sequence; L: the base's 32, or the longest caption's
    pooled: torch.Tensor          # (N, 64) CLIP pooled
    text_ids: torch.Tensor        # (L, 3) zeros, as encode_prompt returns


@torch.no_grad()
def encode_captions(pipe: FluxPipeline, captions: Sequence[str], batch: int = 256) -> TextCache:
    """``pipe.encode_prompt`` on every distinct caption once, expanded back to ``captions``."""
    uniq = sorted(set(captions))
    index = {c: i for i, c in enumerate(uniq)}
    length = sequence_length(pipe, uniq)  # one length for all, so the batches concatenate
    pe, po, ids = [], [], None
    for k in range(0, len(uniq), batch):
        e, p, ids = pipe.encode_prompt(uniq[k:k + batch], prompt_2=None, max_sequence_length=length)
        pe.append(e)
        po.append(p)
    rows = torch.tensor([index[c] for c in captions])
    return TextCache(torch.cat(pe)[rows], torch.cat(po)[rows], ids)


@torch.no_grad()
def encode_images(pipe: FluxPipeline, images: np.ndarray, batch: int = 512) -> torch.Tensor:
    """uint8 N×H×W×3 → unscaled VAE latents N×C×h×w (``latent_dist.mode()``)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    x = x.to(pipe.vae.device, pipe.vae.dtype)  # where the VAE is (a GPU base: the GPU, in its precision)
    return torch.cat([pipe.vae.encode(x[k:k + batch]).latent_dist.mode() for k in range(0, len(x), batch)])


def scale_latents(pipe: FluxPipeline, latents: torch.Tensor) -> torch.Tensor:
    """Apply the VAE's ``shift_factor``/``scaling_factor`` as the FLUX training scripts do."""
    return (latents - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor


def training_scheduler(pipe: FluxPipeline) -> FlowMatchEulerDiscreteScheduler:
    """A fresh copy of the pipeline's scheduler (the scripts' ``noise_scheduler_copy``)."""
    return FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)


def flow_matching_loss(
    pipe: FluxPipeline, x0: torch.Tensor, prompt_embeds: torch.Tensor, pooled: torch.Tensor,
    text_ids: torch.Tensor, gen: torch.Generator, sched: FlowMatchEulerDiscreteScheduler,
    weighting_scheme: str = "none",
) -> torch.Tensor:
    """One FLUX flow-matching loss on scaled latents ``x0`` (B×C×h×w), as in diffusers' scripts.

    ``sched`` is an untouched copy of the pipeline's scheduler (``training_scheduler``): its
    timesteps/sigmas are the training grid (unshifted, since FLUX uses dynamic shifting).
    """
    bsz, ch, h, w = x0.shape
    # the noise and timesteps are drawn on the CPU (the same draws whatever the device), then moved
    noise = torch.randn(x0.shape, generator=gen).to(x0.device, x0.dtype)
    u = compute_density_for_timestep_sampling(
        weighting_scheme, bsz, logit_mean=0.0, logit_std=1.0, mode_scale=1.29, generator=gen)
    indices = (u * sched.config.num_train_timesteps).long().clamp(max=sched.config.num_train_timesteps - 1)
    timesteps = sched.timesteps[indices].to(x0.device)
    sigmas = sched.sigmas[indices].view(bsz, 1, 1, 1).to(x0.device, x0.dtype)
    noisy = (1.0 - sigmas) * x0 + sigmas * noise
    packed = FluxPipeline._pack_latents(noisy, bsz, ch, h, w)
    img_ids = FluxPipeline._prepare_latent_image_ids(bsz, h // 2, w // 2, x0.device, x0.dtype)
    guidance = torch.ones(bsz, device=x0.device) if pipe.transformer.config.guidance_embeds else None
    pred = pipe.transformer(
        hidden_states=packed, timestep=(timesteps / 1000).to(x0.dtype), guidance=guidance, pooled_projections=pooled,
        encoder_hidden_states=prompt_embeds, txt_ids=text_ids, img_ids=img_ids, return_dict=False)[0]
    pred = FluxPipeline._unpack_latents(pred, h * pipe.vae_scale_factor, w * pipe.vae_scale_factor,
                                        pipe.vae_scale_factor)
    weighting = compute_loss_weighting_for_sd3(weighting_scheme, sigmas)
    target = noise - x0
    return torch.mean((weighting.float() * (pred.float() - target.float()) ** 2).reshape(bsz, -1), 1).mean()


def fit_vae(pipe: FluxPipeline, images: np.ndarray, *, steps: int, seed: int, batch: int = 16,
            lr: float = 4e-3, kl_weight: float = 1e-6) -> list[float]:
    """Train the tiny VAE as an autoencoder (MSE + tiny KL, as SD-style VAEs); returns losses."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    vae = pipe.vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = get_scheduler("cosine", opt, num_warmup_steps=steps // 10, num_training_steps=steps)
    gen = torch.Generator().manual_seed(seed + 11)
    losses = []
    for _ in range(steps):
        xb = x[torch.randint(0, len(x), (batch,), generator=gen)]
        dist = vae.encode(xb).latent_dist
        loss = (vae.decode(dist.sample(generator=gen)).sample - xb).pow(2).mean() + kl_weight * dist.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    vae.eval().requires_grad_(False)
    return losses


def train_base(
    images: np.ndarray, captions: Sequence[str], *, steps: int, seed: int, out_dir: str | Path,
    progress: bool = True, batch_size: int = 32, lr: float = 2e-3, vae_steps: int | None = None,
    caption_dropout: float = 0.1, weighting_scheme: str = "none",
    log: dict | None = None,
) -> Path:
    """Build, train and ``save_pretrained`` the tiny FLUX base; returns ``out_dir``.

    ``images`` are N×32×32×3 uint8 with one caption each. The VAE is trained first for
    ``vae_steps`` (default ``min(600, steps)``), then the transformer for ``steps`` at batch
    ``batch_size``. ``log``, if given, receives loss curves and timings.
    """
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    pipe = build_tiny_flux(seed)
    vae_losses = fit_vae(pipe, images, steps=min(600, steps) if vae_steps is None else vae_steps, seed=seed)
    raw = encode_images(pipe, images)
    pipe.vae.register_to_config(shift_factor=float(raw.mean()), scaling_factor=float(1.0 / raw.std()))
    x0_all = scale_latents(pipe, raw)
    t_vae = time.perf_counter() - t0
    text = encode_captions(pipe, [*captions, ""])
    empty = len(captions)
    tr = pipe.transformer.train()
    opt = torch.optim.AdamW(tr.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=1e-4)
    lr_sched = get_scheduler("cosine", opt, num_warmup_steps=min(50, steps // 10), num_training_steps=steps)
    gen = torch.Generator().manual_seed(seed + 7)
    fm_sched = training_scheduler(pipe)
    losses = []
    bar = tqdm(range(steps), desc="tiny-flux base", disable=not progress)
    for _ in bar:
        idx = torch.randint(0, len(captions), (batch_size,), generator=gen)
        tidx = torch.where(torch.rand(batch_size, generator=gen) < caption_dropout, empty, idx)
        loss = flow_matching_loss(pipe, x0_all[idx], text.prompt_embeds[tidx], text.pooled[tidx],
                                  text.text_ids, gen, fm_sched, weighting_scheme)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tr.parameters(), 1.0)
        opt.step()
        lr_sched.step()
        losses.append(loss.item())
        if len(losses) % 20 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
    tr.eval()
    out = Path(out_dir)
    pipe.save_pretrained(out)
    if log is not None:
        log.update(vae_losses=vae_losses, losses=losses, seconds_vae=t_vae,
                   seconds_total=time.perf_counter() - t0)
    return out
