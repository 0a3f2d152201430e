"""The fine-grained fusion gate of one base linear layer (AutoLoRA eq. 6-8).

With ``x`` the base layer's *output* and ``L_i = B_i A_i h`` the i-th LoRA branch output::

    x̂ = LN(x),  L̂_i = LN(L_i)
    G_i = σ(x̂ ⊙ w_x + L̂_i ⊙ w_l + x̂ ⊙ L̂_i ⊙ w_c + b)
    x' = x + w_o ⊙ Σ_i G_i ⊙ L_i

Choices (the paper leaves them open):

* **LayerNorm without affine.** An affine LN (γ x̂ + β) adds nothing: γ and β fold into w_x, w_l,
  w_c and b (the product term expands into terms of the same three forms), so the function class
  is the same and the parameters are not redundant.
* **Initialisation = plain addition, exactly.** w_x = w_l = w_c = 0, b = 0, w_o = 2: every gate is
  σ(0) = 1/2 and w_o ⊙ G_i = 1, so an untrained gate returns x + Σ_i L_i bit for bit, and training
  starts where the sigmoid's slope is largest (at b = +6, G ≈ 1 would be nearly saturated).
  (The authors' released gate draws w_x, w_l, w_c, b from N(0, 1) and sets w_o = 1: an untrained gate
  is then arbitrary. :meth:`FusionGate.init_as_authors` starts from there, for the anchor row of the
  fusion report.)
* **Global LoRA branch.** The global LoRA (rank-r_g truncation of Σ_i B_i A_i) is one more gated
  branch as in the paper, with one more per-layer vector ``w_g`` (zero at init) multiplying its
  contribution, so the untrained gate still equals plain addition of the k LoRAs instead of
  counting their main directions twice.
* **Timestep variant** (``time_features > 0``): b becomes b + W φ(t) with φ(t) the sinusoidal
  features of the transformer's timestep t ∈ [0, 1] and W zero-initialised (untrained = the plain
  gate).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

EPS = 1e-5


def timestep_features(t: torch.Tensor, count: int) -> torch.Tensor:
    """Sinusoidal features [sin(2^j π t), cos(2^j π t)] of timesteps ``t`` [B] in [0, 1] -> [B, count]."""
    freqs = math.pi * 2.0 ** torch.arange(count // 2, dtype=torch.float32, device=t.device)
    angles = t.float().reshape(-1, 1) * freqs
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class FusionGate(nn.Module):
    """Gate parameters of one base layer (width ``dim``), shared by whatever LoRAs are active."""

    def __init__(self, dim: int, *, time_features: int = 0, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        if time_features % 2:
            raise ValueError(f"time_features must be even, got {time_features}")
        kw = dict(dtype=dtype, device=device)
        self.dim = dim
        self.w_x = nn.Parameter(torch.zeros(dim, **kw))
        self.w_l = nn.Parameter(torch.zeros(dim, **kw))
        self.w_c = nn.Parameter(torch.zeros(dim, **kw))
        self.b = nn.Parameter(torch.zeros(dim, **kw))
        self.w_o = nn.Parameter(torch.full((dim,), 2.0, **kw))
        self.w_g = nn.Parameter(torch.zeros(dim, **kw))
        self.time_features = time_features
        self.time_proj = nn.Linear(time_features, dim, bias=False, **kw) if time_features else None
        if self.time_proj is not None:
            nn.init.zeros_(self.time_proj.weight)

    @torch.no_grad()
    def init_as_authors(self, generator: torch.Generator | None = None) -> None:
        """The authors' released initialisation (DiffSynth-Studio's ``LoraMerger``): w_x, w_l, w_c, b drawn
        from N(0, 1), w_o = 1; w_g = 1, the global LoRA branch weighed as one more LoRA (their merger has
        one output weight for every branch). The timestep projection, if any, stays zero."""
        for p in (self.w_x, self.w_l, self.w_c, self.b):
            p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float32).to(p.dtype))
        self.w_o.fill_(1.0)
        self.w_g.fill_(1.0)

    def bias(self, x: torch.Tensor, time_feats: torch.Tensor | None) -> torch.Tensor:
        """b, or b + W φ(t) shaped to broadcast over ``x`` [B, ..., d] when timestep-conditioned."""
        b = self.b if self.b.dtype == x.dtype else self.b.to(x.dtype)
        if self.time_proj is None or time_feats is None:
            return b
        shift = self.time_proj(time_feats.to(self.b.dtype)).to(x.dtype)  # [B, d]
        return b + shift.reshape(shift.shape[0], *([1] * (x.dim() - 2)), self.dim)

    def forward(self, x: torch.Tensor, branches: torch.Tensor, *, global_last: bool = False,
                time_feats: torch.Tensor | None = None,
                stats: tuple[torch.Tensor, torch.Tensor] | None = None,
                inplace: bool = False, scratch: torch.Tensor | None = None) -> torch.Tensor:
        """Fuse ``branches`` [n, *x.shape] (LoRA outputs; the global LoRA last if ``global_last``) into ``x``.

        ``stats``: (rstd, shift) [n, ..., 1] with LN(L_i) = L_i ⊙ rstd + shift, when the caller has
        them cheaper (see ``LoraBranches.stats``); else the branches go through ``F.layer_norm``.
        ``inplace`` (inference only, no autograd): ``x`` and ``branches`` may be overwritten (the
        result is ``x``), and ``scratch`` (like ``branches``) spares the one [n, ..., d] allocation.
        """
        d = self.dim
        # the parameters in the activations' precision: no copy when they match (inference); gates
        # trained in float32 on a bfloat16 base compute in bfloat16 and keep float32 for the optimiser
        params = (self.w_x, self.w_l, self.w_c, self.w_o, self.w_g)
        w_x, w_l, w_c, w_o, w_g = params if self.w_x.dtype == x.dtype else (p.to(x.dtype) for p in params)
        xh = F.layer_norm(x, (d,), eps=EPS)
        c = torch.addcmul(self.bias(x, time_feats), xh, w_x)  # the branch-independent terms
        v = torch.addcmul(w_l, xh, w_c)  # L̂_i ⊙ (w_l + x̂ ⊙ w_c)
        if stats is None:
            normed = F.layer_norm(branches, (d,), eps=EPS)
        elif not inplace:
            normed = torch.addcmul(stats[1], branches, stats[0])
        else:
            out = torch.empty_like(branches) if scratch is None else scratch
            normed = torch.addcmul(stats[1], branches, stats[0], out=out)
        if not inplace:
            pre = torch.addcmul(c, normed, v)
            gated = torch.sigmoid(pre) * branches
            if global_last:
                gated = torch.cat([gated[:-1], gated[-1:] * w_g])
            return torch.addcmul(x, gated.sum(0), w_o)
        # the same arithmetic with no [n, ..., d] allocation (each such pass costs as much as the math)
        pre = torch.addcmul(c, normed, v, out=normed)
        gated = pre.sigmoid_().mul_(branches)
        if global_last:
            gated[-1].mul_(w_g)
        return x.addcmul_(torch.sum(gated, 0, out=branches[0]), w_o)
