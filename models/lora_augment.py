"""Augmentations of a LoRA that need no new data: exact operations on its factors.

* :func:`reparametrise`: ``B -> B M``, ``A -> M^-1 A`` (``B A`` unchanged): teaches nothing to an
  encoder that is invariant by construction, but exercises that invariance in training.
* :func:`truncate_rank`: the best rank-``r`` approximation of ``B A`` (Eckart-Young) from QR of
  ``B`` and ``A^T`` and an SVD of the small ``r0 x r0`` core; never a ``d x k`` matrix.
* :func:`drop_layers`: a partial-coverage copy (some LoRAs adapt only some blocks).
* :func:`rescale`: the LoRA at another strength.

Hand-written: these are a few lines of linear algebra on factors that no library exposes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

Factors = tuple[Tensor, Tensor]  # (A [r, k], B [d, r]), ΔW = B @ A


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def reparametrise(a: Tensor, b: Tensor, generator: torch.Generator,
                  max_condition: float = 4.0) -> Factors:
    """``(M^-1 A, B M)`` for a random ``M = U diag(s)`` (``U`` orthogonal, ``s`` log-uniform in
    ``[1/sqrt(c), sqrt(c)]``, so ``cond(M) <= max_condition``); ``B A`` is unchanged."""
    r = a.shape[0]
    if r == 0:
        return a.clone(), b.clone()
    gauss = torch.randn(r, r, generator=generator, dtype=torch.float64)
    u, upper = torch.linalg.qr(gauss)
    u = u * torch.sign(torch.diagonal(upper))  # a Haar-distributed orthogonal matrix
    half = 0.5 * math.log(max_condition)
    s = torch.exp((torch.rand(r, generator=generator, dtype=torch.float64) * 2 - 1) * half)
    m = u * s                                  # U diag(s)
    m_inv = (u / s).T                           # diag(1/s) U^T
    a64, b64 = a.to(torch.float64), b.to(torch.float64)
    return (m_inv @ a64).to(a.dtype), (b64 @ m).to(b.dtype)


def truncate_rank(a: Tensor, b: Tensor, r: int) -> Factors:
    """Factors of the best rank-``r`` approximation of ``B A`` (singular values split evenly
    between the two factors); a LoRA of rank ``<= r`` is returned as it is (copied)."""
    r0 = a.shape[0]
    if r >= r0:
        return a.clone(), b.clone()
    dtype = a.dtype
    q_b, r_b = torch.linalg.qr(b.to(torch.float64))      # B = Q_b R_b,      Q_b [d, r0]
    q_a, r_a = torch.linalg.qr(a.to(torch.float64).T)    # A^T = Q_a R_a,    Q_a [k, r0]
    u, s, vh = torch.linalg.svd(r_b @ r_a.T)             # B A = Q_b (R_b R_a^T) Q_a^T
    root = s[:r].sqrt()
    new_b = (q_b @ u[:, :r]) * root
    new_a = root.unsqueeze(1) * (vh[:r] @ q_a.T)
    return new_a.to(dtype), new_b.to(dtype)


def drop_layers(lora: Mapping[str, Factors], keep_fraction: float,
                generator: torch.Generator) -> dict[str, Factors]:
    """A random ``keep_fraction`` of the layers (at least one), the others dropped."""
    names = sorted(lora)
    if not names:
        return {}
    keep = max(1, round(keep_fraction * len(names)))
    order = torch.randperm(len(names), generator=generator)[:keep].tolist()
    return {names[i]: lora[names[i]] for i in sorted(order)}


def rescale(lora: Mapping[str, Factors], s: float) -> dict[str, Factors]:
    """The LoRA at strength ``s`` (``B -> s B``)."""
    return {name: (a, b * s) for name, (a, b) in lora.items()}


def augment(lora: Mapping[str, Factors], generator: torch.Generator, *,
            p_reparametrise: float = 1.0, p_truncate: float = 0.3, min_rank: int = 1,
            p_drop: float = 0.5, keep_range: tuple[float, float] = (0.5, 1.0),
            scale_range: tuple[float, float] = (0.5, 2.0)) -> dict[str, Factors]:
    """A random combination of the augmentations above (each layer reparametrised with
    probability ``p_reparametrise``, the whole LoRA rank-truncated to a random rank with
    ``p_truncate``, layers dropped with ``p_drop``, strength log-uniform in ``scale_range``)."""
    out = dict(lora)
    if p_drop > 0 and float(torch.rand((), generator=generator)) < p_drop:
        out = drop_layers(out, _uniform(generator, *keep_range), generator)
    if p_truncate > 0 and float(torch.rand((), generator=generator)) < p_truncate:
        top = max(a.shape[0] for a, _ in out.values()) if out else 0
        if top > min_rank:
            r = int(torch.randint(min_rank, top, (), generator=generator))
            out = {name: truncate_rank(a, b, r) for name, (a, b) in out.items()}
    if p_reparametrise > 0:
        for name, (a, b) in list(out.items()):
            if float(torch.rand((), generator=generator)) < p_reparametrise:
                out[name] = reparametrise(a, b, generator)
    low, high = scale_range
    if (low, high) != (1.0, 1.0):
        out = rescale(out, math.exp(_uniform(generator, math.log(low), math.log(high))))
    return out
