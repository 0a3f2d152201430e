"""The global LoRA of one layer: the exact rank-r truncation of Σ_i B_i A_i, never forming a d×k matrix.

Σ_i B_i A_i = [B_1 … B_k] [A_1; …; A_k] = B_s A_s.  With B_s = Q_b R_b and A_s^T = Q_a R_a (reduced
QR), B_s A_s = Q_b (R_b R_a^T) Q_a^T, so the SVD of the small core R_b R_a^T (Σr × Σr) gives the
SVD of the sum: U_s = Q_b U, V_s = Q_a V.  Truncating to the top r singular values is the best
rank-r approximation (Eckart-Young).  Written by hand: torch has QR and SVD, but no library offers
this low-rank-sum truncation.  Cost O((d + k)(Σr)^2).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def truncate_sum(b_s: torch.Tensor, a_s: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` factors (A_g [..., r, k], B_g [..., d, r]) of B_s A_s (B_s [..., d, R], A_s [..., R, k]).

    Leading dims are a batch (layers of one shape are truncated in one call).  The singular values
    are split evenly between the factors (√s each); r = min(rank, R, d, k).
    """
    q_b, r_b = torch.linalg.qr(b_s)                # [.., d, m], [.., m, R]
    q_a, r_a = torch.linalg.qr(a_s.mT)             # [.., k, n], [.., n, R]
    u, s, vh = torch.linalg.svd(r_b @ r_a.mT)      # the small [m, n] core
    r = min(rank, s.shape[-1])
    root = s[..., :r].sqrt()
    return (root.unsqueeze(-1) * vh[..., :r, :]) @ q_a.mT, q_b @ (u[..., :r] * root.unsqueeze(-2))


def global_lora(factors: Sequence[tuple[torch.Tensor, torch.Tensor]], rank: int,
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(A_g [r, k], B_g [d, r]) with B_g A_g the best rank-``rank`` approximation of Σ_i B_i A_i.

    ``factors`` are (A_i [r_i, k], B_i [d, r_i]).  Computed in float32 (float64 if the inputs
    are), returned in the dtype of the first A.
    """
    if not factors:
        raise ValueError("global_lora needs at least one LoRA")
    dtype = factors[0][0].dtype
    work = torch.float64 if dtype == torch.float64 else torch.float32
    b_s = torch.cat([b for _, b in factors], dim=1).to(work)  # [d, Σr]
    a_s = torch.cat([a for a, _ in factors], dim=0).to(work)  # [Σr, k]
    a_g, b_g = truncate_sum(b_s, a_s, rank)
    return a_g.to(dtype), b_g.to(dtype)
